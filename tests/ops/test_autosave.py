"""Autosave: every returned image lands on disk as a PNG with its infotext; errors never fail."""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sdproxy.core.images import png_bytes
from sdproxy.fakewebui import FakeNodeSettings
from sdproxy.ops.autosave import Autosaver, images_to_save
from tests.support import SMALL, fake_nodes, pixels, post_json, proxy, wait_until


def response(images: list[str], info: dict[str, Any]) -> dict[str, Any]:
    return {"images": images, "parameters": {}, "info": json.dumps(info)}


class TestImagesToSave:
    """Which file each returned image becomes: seed, node, grid and extras."""

    def test_images_named_by_seed_and_node(self) -> None:
        """Rendered images take their own seed and the node whose share covers them."""
        body = response(
            ["i0", "i1", "i2"],
            {"all_seeds": [10, 11, 12], "infotexts": ["t0", "t1", "t2"], "seed": 10},
        )
        got = images_to_save(body, [("a", 0, 1), ("b", 2, 2)])
        assert [(x.image_b64, x.infotext, x.stem) for x in got] == [
            ("i0", "t0", "seed10-a"),
            ("i1", "t1", "seed11-a"),
            ("i2", "t2", "seed12-b"),
        ]

    def test_grid_and_extra_images(self) -> None:
        """A leading grid is named as a grid; images after the infotexts are extras."""
        info = {
            "all_seeds": [5, 6],
            "infotexts": ["grid", "t0", "t1"],
            "index_of_first_image": 1,
            "seed": 5,
        }
        got = images_to_save(response(["g", "i0", "i1", "mask"], info), [("n", 0, 1)])
        assert [(x.infotext, x.stem) for x in got] == [
            ("grid", "grid-seed5"),
            ("t0", "seed5-n"),
            ("t1", "seed6-n"),
            (None, "extra1"),
        ]

    @pytest.mark.parametrize(
        "body",
        [None, [], {}, {"images": "x"}, {"images": []}, response([], {"infotexts": ["t"]})],
    )
    def test_nothing_to_save(self, body: Any) -> None:
        """No images (send_images false, odd bodies): nothing to write."""
        assert images_to_save(body, []) == []

    def test_unsplit_and_broken_info(self) -> None:
        """Without shares or readable info the image is still saved, named as well as known."""
        unsplit = images_to_save(response(["i"], {"all_seeds": [3], "infotexts": ["t"]}), [])
        assert [(x.infotext, x.stem) for x in unsplit] == [("t", "seed3")]
        broken = images_to_save({"images": ["i"], "info": "{not json"}, [("a", 0, 0)])
        assert [(x.infotext, x.stem) for x in broken] == [(None, "extra1")]


def everything_under(folder: Path) -> list[Path]:
    return list(folder.rglob("*"))


async def autosave_errors(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "sdproxy_autosave_errors_total"
    )


class TestAutosave:
    """Through the proxy: images written after the answer; a bad folder only logs."""

    async def test_autosave_writes_every_returned_image(self, tmp_path: Path) -> None:
        """Each image is a PNG named with date, seed and node, its infotext in `parameters`."""
        folder = tmp_path / "out"
        async with (
            fake_nodes(FakeNodeSettings(name="gpu-a"), FakeNodeSettings(name="gpu-b")) as nodes,
            proxy(nodes, autosave={"dir": str(folder)}) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 4, "seed": 1234, **SMALL}
            owners = []  # the two answers may be split differently (the planner learns)
            for _ in range(2):  # the same seeds twice: no file is overwritten
                status, answer, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
                assert status == 200
                owner = {}
                for share in headers["X-Sdproxy-Shares"].split(","):
                    node, _, span = share.partition(":")
                    first, _, last = span.partition("-")
                    owner.update(dict.fromkeys(range(int(first), int(last) + 1), node))
                owners.append(owner)
            await wait_until(lambda: len(list(folder.glob("*.png"))) >= 8, "eight images on disk")
        info = json.loads(answer["info"])
        files = sorted(folder.glob("*.png"))
        assert len(files) == 8
        for index, seed in enumerate(info["all_seeds"]):
            pattern = rf"\d{{8}}-\d{{6}}-seed{seed}-(.+?)(-2)?\.png"
            matching = [f for f in files if re.fullmatch(pattern, f.name)]
            named = sorted(m.group(1) for f in matching if (m := re.fullmatch(pattern, f.name)))
            assert named == sorted(o[index] for o in owners), [f.name for f in files]
            for path in matching:
                with Image.open(path) as image:
                    assert image.format == "PNG"
                    assert image.info["parameters"] == info["infotexts"][index]
                saved = base64.b64encode(path.read_bytes()).decode()
                assert pixels(saved) == pixels(answer["images"][index])

    async def test_autosave_off_by_default(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without [autosave] dir nothing is written anywhere."""
        monkeypatch.chdir(tmp_path)
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, _, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", SMALL)
            assert status == 200
        assert everything_under(tmp_path) == []

    async def test_autosave_unwritable_folder_logs_once(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A folder that cannot exist (under a regular file) fails no request; one warning."""
        blocker = tmp_path / "file.txt"
        blocker.write_text("not a folder")
        caplog.set_level(logging.INFO, logger="sdproxy.ops.autosave")
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, autosave={"dir": str(blocker / "sub")}) as url,
            aiohttp.ClientSession() as session,
        ):
            for _ in range(2):
                status, answer, _ = await post_json(
                    session, f"{url}/sdapi/v1/txt2img", {"batch_size": 3, **SMALL}
                )
                assert status == 200
                assert len(answer["images"]) == 3
            await wait_until(lambda: _errors_at_least(session, url, 6), "six failed saves counted")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "file.txt" in warnings[0].getMessage()
        assert "ENOTDIR" in warnings[0].getMessage()


async def _errors_at_least(session: aiohttp.ClientSession, url: str, count: int) -> bool:
    return await autosave_errors(session, url) >= count


class TestFullDisk:
    """A full disk (the kernel's ENOSPC, from /dev/full) leaves no partial file and logs once."""

    def test_full_disk_logs_once_and_recovers(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Every write fails with ENOSPC: one warning, no files; a later save logs recovery."""
        real_open = Path.open

        def full_disk_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if mode == "xb":  # the file is created, then writing it hits a full disk
                real_open(self, "xb").close()
                return real_open(Path("/dev/full"), "wb")
            return real_open(self, mode, *args, **kwargs)

        image = base64.b64encode(png_bytes(Image.new("RGB", (8, 8)), None)).decode()
        body = response([image] * 3, {"all_seeds": [1, 2, 3], "infotexts": ["a", "b", "c"]})
        todo = images_to_save(body, [("n", 0, 2)])
        saver = Autosaver(tmp_path / "out")
        caplog.set_level(logging.INFO, logger="sdproxy.ops.autosave")
        monkeypatch.setattr(Path, "open", full_disk_open)
        saver._save_all(todo, "20261128-000000")
        monkeypatch.undo()
        assert everything_under(tmp_path / "out") == []
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "ENOSPC" in warning.getMessage()
        saver._save_all(todo[:1], "20261128-000001")
        assert [p.name for p in everything_under(tmp_path / "out")] == [
            "20261128-000001-seed1-n.png"
        ]
        assert "works again" in caplog.records[-1].getMessage()
