"""Tests for merging the nodes' lists, checkpoint matching and cmd-flags redaction."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdproxy.core.inventory import (
    REDACTED,
    find_checkpoint,
    intersect_named,
    merge_embeddings,
    merge_scripts,
    redact_flags,
    union_named,
)

NAMES = st.sampled_from(["Euler", "Euler a", "DPM++ 2M", "DDIM", "UniPC", "LMS"])
NODE_LISTS = st.lists(st.lists(NAMES, unique=True), min_size=1, max_size=4)


def entries(names: list[str], node: int) -> list[dict[str, Any]]:
    return [{"name": name, "node": node} for name in names]


class TestIntersection:
    """What every node can run: the names all nodes list, in the first node's order."""

    @given(NODE_LISTS)
    def test_intersect_named_is_what_every_node_has(self, lists: list[list[str]]) -> None:
        """A name is kept exactly when every node lists it; order and entries are the first's."""
        merged = intersect_named([entries(names, i) for i, names in enumerate(lists)])
        expected = [name for name in lists[0] if all(name in other for other in lists)]
        assert [entry["name"] for entry in merged] == expected
        assert all(entry["node"] == 0 for entry in merged)

    def test_intersect_named_of_nothing_is_empty(self) -> None:
        """No node answered: nothing can be run."""
        assert intersect_named([]) == []

    def test_merge_scripts_per_mode(self) -> None:
        """A script on one node only is left out, per mode; a mode one node lacks is empty."""
        merged = merge_scripts(
            [
                {"txt2img": ["adetailer", "lora", "x/y/z plot"], "img2img": ["lora"]},
                {"txt2img": ["lora", "x/y/z plot"]},
            ]
        )
        assert merged == {"txt2img": ["lora", "x/y/z plot"], "img2img": []}


class TestUnion:
    """What routing makes safe: everything any node has, once, the first node's entry."""

    @given(NODE_LISTS)
    def test_union_named_lists_each_name_once(self, lists: list[list[str]]) -> None:
        """Every name any node lists appears once, with the entry of the first node listing it."""
        merged = union_named([entries(names, i) for i, names in enumerate(lists)])
        names = [entry["name"] for entry in merged]
        assert sorted(names) == sorted({name for each in lists for name in each})
        for entry in merged:
            first = next(i for i, each in enumerate(lists) if entry["name"] in each)
            assert entry["node"] == first

    def test_merge_embeddings_loaded_anywhere_is_loaded(self) -> None:
        """An embedding loaded on one node and skipped on another counts as loaded."""
        merged = merge_embeddings(
            [
                {"loaded": {"a": {"vectors": 1}}, "skipped": {"b": {"vectors": 2}}},
                {"loaded": {"b": {"vectors": 3}}, "skipped": {"c": {}}},
            ]
        )
        assert merged == {
            "loaded": {"a": {"vectors": 1}, "b": {"vectors": 3}},
            "skipped": {"c": {}},
        }


class TestRedaction:
    """cmd-flags never hands out a credential."""

    @pytest.mark.parametrize(
        ("name", "value", "redacted"),
        [
            ("api_auth", "user:pass", True),
            ("gradio_auth", "a:b,c:d", True),
            ("gradio_auth_path", "/etc/auth.txt", True),
            ("hf_token", "hf_abc", True),
            ("tls_keyfile", "/k.pem", True),
            ("api_auth", None, False),
            ("api_auth", "", False),
            ("api_server_stop", True, False),
            ("port", 7861, False),
            ("listen", True, False),
        ],
    )
    def test_redact_flags(self, name: str, value: Any, redacted: bool) -> None:
        """Named like a credential and holding a value: replaced; anything else: kept."""
        result = redact_flags({name: value, "nowebui": True})
        assert result[name] == (REDACTED if redacted else value)
        assert result["nowebui"] is True


SD15 = {
    "title": "v1-5-pruned-emaonly.safetensors [6ce0161689]",
    "model_name": "v1-5-pruned-emaonly",
    "hash": "6ce0161689",
    "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
    "filename": "/webui/models/Stable-diffusion/sd/v1-5-pruned-emaonly.safetensors",
    "config": None,
}
XL = {
    "title": "sd_xl_base_1.0.safetensors [31e35c80fc]",
    "model_name": "sd_xl_base_1.0",
    "hash": "31e35c80fc",
    "sha256": "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
    "filename": "/webui/models/Stable-diffusion/sd_xl_base_1.0.safetensors",
    "config": None,
}


class TestFindCheckpoint:
    """Checkpoint names resolve as the webui resolves them."""

    @pytest.mark.parametrize(
        "name",
        [
            SD15["title"],
            "v1-5-pruned-emaonly",
            "6ce0161689",
            SD15["sha256"],
            "sd/v1-5-pruned-emaonly.safetensors",
            "v1-5-pruned-emaonly.safetensors",
            "v1-5-pruned-emaonly [6ce0161689]",
        ],
    )
    def test_find_checkpoint_by_alias(self, name: str) -> None:
        """Every alias the webui accepts in POST /options finds the entry."""
        assert find_checkpoint(name, [XL, SD15], closest=False) is SD15

    def test_find_checkpoint_closest_only_for_overrides(self) -> None:
        """A part of a title matches for override_settings only, the shortest title first."""
        assert find_checkpoint("pruned", [XL, SD15], closest=False) is None
        assert find_checkpoint("pruned", [XL, SD15], closest=True) is SD15
        assert find_checkpoint("sd_xl_base_1.0.safetensors [0000000000]", [XL], closest=True) is XL

    def test_find_checkpoint_unknown(self) -> None:
        """A name no entry has is None, however it is looked up."""
        assert find_checkpoint("nothing", [XL, SD15], closest=True) is None
        assert find_checkpoint("", [XL, SD15], closest=True) is None
