"""Benchmarks: the state file, the command, and the background benchmark of serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sdproxy.cli import run_benchmarks
from sdproxy.cluster.benchmark import (
    Benchmarker,
    BenchmarkResult,
    fit_runs,
    load_state,
    save_state,
)
from sdproxy.cluster.clock import LoopClock
from sdproxy.cluster.state import MemoryState
from sdproxy.config import BenchmarkSettings, Settings, load_settings
from sdproxy.core.speed import image_work
from sdproxy.fakewebui import FakeNodeSettings
from tests.support import (
    SMALL,
    assert_same_as_one_node,
    cluster_status,
    fake_nodes,
    free_port,
    post_json,
    proxy,
    reference_answer,
    wait_for_status,
    wait_until,
)

QUICK = {"steps": 20, "width": 64, "height": 64, "warmup_runs": 1, "timed_runs": 1}


def result(name: str = "a", **changes: Any) -> BenchmarkResult:
    fields: dict[str, Any] = {
        "node": name,
        "url": "http://127.0.0.1:7861",
        "measured_at": 1_700_000_000.5,
        "checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]",
        "steps": 20,
        "width": 512,
        "height": 512,
        "runs": ((1, 1.5), (4, 3.0)),
        "overhead_s": 1.0,
        "per_image_s": 0.5,
    }
    fields.update(changes)
    return BenchmarkResult(**fields)


class TestStateFile:
    """Results survive a write and a read; a bad file counts as no results."""

    def test_state_round_trip(self, tmp_path: Path) -> None:
        """What is saved is what is loaded, for every node."""
        path = tmp_path / "sub" / "state.json"
        saved = {"a": result("a"), "b": result("b", checkpoint=None, runs=((2, 0.25),))}
        save_state(path, saved)
        assert load_state(path) == saved
        assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left

    @pytest.mark.parametrize(
        "content", [b"{not json", b'{"version": 99, "benchmarks": {}}', b'{"version": 1}', b"[]"]
    )
    def test_bad_state_file_is_ignored(self, tmp_path: Path, content: bytes) -> None:
        """Corrupt, foreign or old files load as nothing stored."""
        path = tmp_path / "state.json"
        path.write_bytes(content)
        assert load_state(path) == {}
        assert load_state(tmp_path / "missing.json") == {}

    def test_default_state_file_beside_config(self, tmp_path: Path) -> None:
        """Unset, the state file is sdproxy-state.json in the config file's directory."""
        config = tmp_path / "c.toml"
        config.write_text('[[nodes]]\nname = "a"\nurl = "http://127.0.0.1:1"\n')
        assert load_settings(config).benchmark.state_file == tmp_path / "sdproxy-state.json"
        config.write_text(
            '[benchmark]\nstate_file = "s/x.json"\n[[nodes]]\nname = "a"\nurl = "http://h:1"\n'
        )
        assert load_settings(config).benchmark.state_file == tmp_path / "s" / "x.json"

    def test_fit_runs_uses_medians(self) -> None:
        """A stray slow run does not move the line: medians of each batch size are fitted."""
        work = image_work(steps=20, width=512, height=512)
        estimate = fit_runs([(1, 1.5), (1, 1.5), (1, 9.0), (4, 3.0), (4, 3.0), (4, 3.1)], work)
        assert estimate.overhead_s == pytest.approx(1.0)
        assert estimate.per_unit_s == pytest.approx(0.5)


class TestBenchmarkCommand:
    """`sdproxy benchmark` times every node, prints a table and stores the results."""

    async def test_benchmark_command_stores_results(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Two nodes of known speed: fitted overhead and per-image time near the truth."""
        async with fake_nodes(
            FakeNodeSettings(name="a", per_image_s=6.4, overhead_s=0.1),
            FakeNodeSettings(name="b", per_image_s=3.2),
        ) as nodes:
            state = tmp_path / "state.json"
            save_state(state, {"old": result("old")})
            settings = Settings.model_validate(
                {
                    "benchmark": {**QUICK, "state_file": str(state)},
                    "nodes": [{"name": n.name, "url": n.url} for n in nodes],
                }
            )
            code = await run_benchmarks(settings, None)
            assert code == 0
            assert [n.node.generations for n in nodes] == [3, 3]  # warm-up and two timed
        results = load_state(state)
        assert sorted(results) == ["a", "b", "old"]
        assert results["a"].overhead_s == pytest.approx(0.1, abs=0.05)
        assert results["a"].per_image_s == pytest.approx(6.4, rel=0.25)
        assert results["b"].per_image_s == pytest.approx(3.2, rel=0.25)
        assert results["a"].checkpoint == "v1-5-pruned-emaonly.safetensors [6ce0161689]"
        out, err = capsys.readouterr()
        assert out.splitlines()[0].split()[:2] == ["node", "checkpoint"]
        assert "run 3/3: timed, batch 4" in err

    async def test_benchmark_command_reports_failed_node(self, tmp_path: Path) -> None:
        """An unreachable node is a failed row and exit status 1; nothing is stored for it."""
        state = tmp_path / "state.json"
        settings = Settings.model_validate(
            {
                "benchmark": {**QUICK, "state_file": str(state)},
                "nodes": [{"name": "dead", "url": f"http://127.0.0.1:{free_port()}"}],
            }
        )
        assert await run_benchmarks(settings, "dead") == 1
        assert load_state(state) == {}


class TestBackgroundBenchmark:
    """serve benchmarks unmeasured nodes in the background and reuses stored results."""

    async def test_serve_benchmarks_then_reuses_results(self, tmp_path: Path) -> None:
        """First start measures both nodes; the second start measures nothing again."""
        state = tmp_path / "state.json"
        bench = {**QUICK, "state_file": str(state)}
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", per_image_s=3.2), FakeNodeSettings(name="b")
            ) as nodes,
            aiohttp.ClientSession() as session,
        ):
            async with proxy(nodes, benchmark=bench) as url:
                status = await wait_for_status(
                    session,
                    url,
                    lambda s: (
                        all(n["benchmark"]["measured_at"] for n in s["nodes"])
                        and not any(n["benchmark"]["running"] for n in s["nodes"])
                    ),
                )
                assert [n["speed"]["source"] for n in status["nodes"]] == ["benchmark"] * 2
                assert status["nodes"][0]["speed"]["per_image_s"] > 0
            assert sorted(load_state(state)) == ["a", "b"]
            generations = [n.node.generations for n in nodes]
            async with proxy(nodes, benchmark=bench) as url:
                status = await cluster_status(session, url)
                assert [n["speed"]["source"] for n in status["nodes"]] == ["benchmark"] * 2
                assert not any(n["benchmark"]["running"] for n in status["nodes"])
                assert [n.node.generations for n in nodes] == generations

                async with session.post(f"{url}/cluster/benchmark?node=b") as resp:
                    assert resp.status == 202
                    assert (await resp.json())["started"] == ["b"]
                before = status["nodes"][1]["benchmark"]["measured_at"]
                await wait_for_status(
                    session, url, lambda s: s["nodes"][1]["benchmark"]["measured_at"] != before
                )
                async with session.post(f"{url}/cluster/benchmark?node=nope") as resp:
                    assert resp.status == 404
                    assert (await resp.json())["error"] == "HTTPException"
            assert nodes[0].node.generations == generations[0]
            assert nodes[1].node.generations == generations[1] + 3


class TestBenchmarkGivesWay:
    """A client job never waits for a benchmark: the run in progress is stopped and redone."""

    async def test_client_job_interrupts_a_benchmark_run_which_is_redone(self) -> None:
        """Mid-run, a request arrives: the node is told to stop, renders the request, and the
        benchmark still ends with all its runs, never two jobs on the node at once."""
        bench = {**QUICK, "batch_sizes": [1, 2]}
        slow = FakeNodeSettings(name="a", per_image_s=32.0)  # 0.5 s an image at 64 px
        async with (
            fake_nodes(slow) as nodes,
            proxy(nodes, benchmark=bench) as url,
            aiohttp.ClientSession() as session,
        ):
            node = nodes[0].node
            await wait_until(lambda: node.state.sampling_step >= 1, what="a benchmark run")
            body = {"batch_size": 1, "seed": 5, **SMALL}
            status, answer, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, answer
            assert headers["X-Sdproxy-Shares"] == "a:0-0"
            assert node.requests["POST /sdapi/v1/interrupt"] == 1
            done = await wait_for_status(
                session, url, lambda s: s["nodes"][0]["benchmark"]["measured_at"] is not None
            )
            assert done["nodes"][0]["benchmark"]["error"] is None
            assert node.stats()["max_concurrent_jobs"] == 1
            single = await reference_answer(session, nodes[0], "txt2img", body, answer)
            assert_same_as_one_node(answer, single, body)


class TestStateFileUnwritable:
    """A state file that cannot be written is a warning; the benchmark still counts."""

    async def test_serve_keeps_result_when_state_file_unwritable(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The state file's folder is a file: the node is still planned by its benchmark."""
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("")
        bench = {**QUICK, "state_file": str(blocker / "state.json")}
        async with (
            fake_nodes(FakeNodeSettings(name="a")) as nodes,
            aiohttp.ClientSession() as session,
            proxy(nodes, benchmark=bench) as url,
        ):
            status = await wait_for_status(
                session,
                url,
                lambda s: (
                    s["nodes"][0]["benchmark"]["measured_at"]
                    and not s["nodes"][0]["benchmark"]["running"]
                ),
            )
            assert status["nodes"][0]["speed"]["source"] == "benchmark"
        assert "cannot store the benchmark of a" in caplog.text


class TestSharedResults:
    """A result heard from another replica is checked before it teaches the model."""

    class _Host:
        """A BenchmarkHost with one node "a"; its state is MemoryState."""

        def __init__(self) -> None:
            config = Settings.model_validate(
                {"nodes": [{"name": "a", "url": "http://127.0.0.1:7861"}]}
            )
            self.clock = LoopClock()
            self.state = MemoryState(config.nodes, config.scheduler, self.clock)
            self.clients = {"a": type("Client", (), {"settings": config.nodes[0]})()}
            self.lanes: dict[str, Any] = {}

    @pytest.mark.parametrize(
        "change",
        [
            {"steps": "20"},
            {"width": 0},
            {"overhead_s": "0.2"},
            {"node": "b"},
            {"runs": [[1]]},
            {"surprise": 1},
        ],
    )
    async def test_a_malformed_result_is_left_alone(self, change: dict[str, Any]) -> None:
        host = self._Host()
        benchmarker = Benchmarker(host, BenchmarkSettings(), 60.0)
        data = {key: value for key, value in result().to_json().items() if key != "url"}
        benchmarker._heard("a", {**data, **change})
        assert benchmarker.results == {}
        benchmarker._heard("a", data)  # the same, well formed: taken
        assert benchmarker.results["a"].overhead_s == result().overhead_s
