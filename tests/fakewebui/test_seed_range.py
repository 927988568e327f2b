"""The fake webui fails a job whose seeds torch cannot take, as a real webui does."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import SMALL, fake_nodes, post_json

OVERFLOW = {
    "error": "RuntimeError",
    "detail": "",
    "body": "",
    "errors": "Overflow when unpacking long",
}


class TestTorchSeedRange:
    """torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; every image's seed seeds one."""

    @pytest.mark.parametrize(
        ("body", "status"),
        [
            ({"seed": 2**64 - 1}, 200),
            ({"seed": 2**64 - 1, "batch_size": 2}, 500),  # the second image's seed overflows
            ({"seed": -(2**63)}, 200),
            ({"seed": -(2**63) - 1}, 500),
            ({"subseed": 2**64}, 200),  # without variation the subseed seeds nothing
            ({"subseed": 2**64, "subseed_strength": 0.5}, 500),
        ],
    )
    async def test_seeds_beyond_torch_fail_the_job(self, body: dict[str, Any], status: int) -> None:
        """500 RuntimeError "Overflow when unpacking long" for a seed out of range."""
        async with fake_nodes(FakeNodeSettings()) as nodes, aiohttp.ClientSession() as session:
            got, answer, _ = await post_json(
                session, f"{nodes[0].url}/sdapi/v1/txt2img", {**SMALL, **body}
            )
        assert got == status, answer
        if status == 500:
            assert answer == OVERFLOW
