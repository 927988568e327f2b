"""Hypothesis strategies for fuzzing sdproxy over HTTP (tests/server/test_fuzz.py)."""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import strategies as st

from tests.support import PATH_ESCAPES

PASSWORD = "fuzz-password-1"
GOOD_AUTH = "Basic " + base64.b64encode(f"fuzz:{PASSWORD}".encode()).decode()
FIELDS = [
    "prompt", "negative_prompt", "batch_size", "n_iter", "seed", "subseed", "subseed_strength",
    "steps", "width", "height", "send_images", "save_images", "script_name", "script_args",
    "init_images", "mask", "alwayson_scripts", "override_settings", "enable_hr", "hr_scale",
    "hr_resize_x", "hr_resize_y", "sampler_name", "scheduler", "cfg_scale", "denoising_strength",
    "styles", "infotext", "force_task_id", "include_init_images", "resize_mode",
]  # fmt: skip
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if depth % 2 else {"k": value}
    return value


SEED_MAX = 2**64 - 1
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=70),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from([PNG, "data:image/png;base64," + PNG, "http://10.0.0.1/x.png", "-1", "1"]),
)
json_values = st.one_of(
    st.recursive(
        json_scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    ),
    st.integers(min_value=60, max_value=300).map(nested),  # around the depth limit of 64
)
# 64-bit edges, with and without the offsets of a batch; floats JSON turns into huge ints.
seeds = st.one_of(
    st.sampled_from([-1, 0, -2, -3, -5, SEED_MAX, SEED_MAX - 1, SEED_MAX - 3, 2**64, -(2**63)]),
    st.sampled_from([-(2**63) - 1, 1e20, 1.8446744073709552e19, "18446744073709551615"]),
    st.integers(min_value=-(2**65), max_value=2**65),
)
# Every way to size hires fix: scales to overflow, resizes that skew the aspect ratio.
hires = st.fixed_dictionaries(
    {"enable_hr": st.sampled_from([True, True, "yes", None])},
    optional={
        "hr_scale": st.one_of(
            st.floats(-2, 8, allow_nan=False), st.sampled_from([0, 1e308, -1e308, None])
        ),
        "hr_resize_x": st.one_of(st.integers(-600, 5000), st.just(0), st.none()),
        "hr_resize_y": st.one_of(st.integers(-600, 5000), st.just(0), st.none()),
        "firstphase_width": st.sampled_from([0, 8, 64, 512, 513, 4096]),
        "firstphase_height": st.sampled_from([0, 8, 64, 512, 513]),
        "width": st.sampled_from([8, 64, 100, 512, 513, 4096]),
        "height": st.sampled_from([1, 8, 64, 512, 513]),
        "override_settings": st.sampled_from([{}, {"use_old_hires_fix_width_height": True}]),
    },
)
# Half start from a body that works, so that mutations reach the nodes and their errors.
VALID = {"prompt": "x", "width": 64, "height": 64, "steps": 20, "init_images": [PNG]}
generation_bodies = st.builds(
    lambda base, extra, special: {**base, **extra, **special},
    st.sampled_from([{}, VALID]),
    st.dictionaries(
        st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), json_values, max_size=5
    ),
    st.one_of(
        st.just({}),
        st.fixed_dictionaries(
            {"seed": seeds},
            optional={"subseed": seeds, "batch_size": st.integers(1, 4), "n_iter": st.just(1)},
        ),
        st.fixed_dictionaries({}, optional={"subseed": seeds, "subseed_strength": st.just(0.5)}),
        hires,
    ),
)
bodies = st.one_of(
    generation_bodies.map(lambda d: ("json", d)),
    st.none(),
    st.binary(max_size=256),
    json_values.map(lambda v: ("json", v)),
)
# How a JSON body travels: plain, compressed, compressed and cut, or in a coding nobody knows.
encodings = st.sampled_from(["", "", "", "gzip", "deflate", "gzip-cut", "br", "x-unknown"])
header_names = st.sampled_from(
    ["Authorization", "Content-Type", "Content-Encoding", "Accept", "Expect", "Cookie", "X-Any"]
    + ["Accept"] * 6  # harmless most of the time, so more requests get past the head
)
header_values = st.one_of(
    st.sampled_from(
        [
            GOOD_AUTH,
            "Basic",
            "Basic ===",
            "Bearer fuzz-key-0001",
            "Bearer",
            "gzip",
            "br",
            "deflate",
            "100-continue",
            "application/json",
            "text/plain; charset=utf-32",
        ]
    ),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
headers = st.dictionaries(header_names, header_values, max_size=3)
queries = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
# Paths near extension routes: traversal spellings and random segments, written raw.
segments = st.sampled_from(["..", ".", "%2e%2e", "%2E.", ".%2e", "%2f", "%5c", "", "x", "a%20b"])
extension_paths = st.one_of(
    st.sampled_from(PATH_ESCAPES),
    st.lists(segments, min_size=1, max_size=4).map(
        lambda parts: "/controlnet/" + "/".join(parts) + "/sdapi/v1/cmd-flags"
    ),
)
