"""What a new user and CI run as written: README's commands, the build metadata, the image."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = "python3 -m venv .venv && . .venv/bin/activate && "


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def code_blocks(section: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


class TestReadmeCommands:
    """README's Quick start works on a machine whose Python refuses system-wide installs."""

    def test_quick_start_installs_into_a_virtualenv(self) -> None:
        """Both commands create and activate .venv before pip touches anything."""
        demo, tests = code_blocks(readme_section("Quick start"))
        assert demo == VENV + "pip install . && sdproxy demo"
        assert tests == VENV + "pip install -e '.[test]' && pytest"

    def test_ci_runs_the_readme_test_command(self) -> None:
        """.ci/run runs README's marked test command, character for character."""
        section = readme_section("Quick start")
        assert "**the test command**" in section
        [_, command] = code_blocks(section)
        ci = (ROOT / ".ci" / "run").read_text().splitlines()
        after_marker = ci[ci.index('echo "== tests"') + 1]
        assert after_marker == command


class TestPackaging:
    """The build uses PEP 639's license expression and ships the pages' assets."""

    def test_license_is_an_spdx_expression(self) -> None:
        """project.license is a string, with a setuptools that reads it (77+) required."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())
        assert project["project"]["license"] == "MIT"
        [setuptools] = [r for r in project["build-system"]["requires"] if "setuptools" in r]
        minimum = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
        assert minimum is not None
        assert int(minimum.group(1)) >= 77

    def test_page_assets_are_package_data(self) -> None:
        """Every file the dashboard and /docs serve is listed as package data and exists."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())
        listed = project["tool"]["setuptools"]["package-data"]["sdproxy.server"]
        for name in ("dashboard.html", "docs.html", "docs.js", "docs.css"):
            assert name in listed
            assert (ROOT / "sdproxy" / "server" / name).is_file()


class TestDockerImage:
    """The image has a writable state directory, used by default, as a volume."""

    def test_state_directory_is_a_volume_owned_by_the_user(self) -> None:
        """/var/lib/sdproxy: created for uid 10001 before VOLUME, set as the state dir."""
        lines = [
            line.strip()
            for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        ]
        env = next(line for line in lines if line.startswith("ENV "))
        assert "SDPROXY_BENCHMARK__STATE_DIR=/var/lib/sdproxy" in env
        create = next(i for i, line in enumerate(lines) if "-o 10001" in line)
        assert "/var/lib/sdproxy" in lines[create]
        volume = lines.index('VOLUME ["/var/lib/sdproxy"]')
        user = lines.index("USER 10001:10001")
        assert create < volume < user

    def test_compose_keeps_the_state_in_a_named_volume(self) -> None:
        """compose.example.yaml mounts a named volume at the state directory."""
        text = (ROOT / "compose.example.yaml").read_text()
        assert "- sdproxy-state:/var/lib/sdproxy" in text
        assert re.search(r"^volumes:\n  sdproxy-state:", text, re.M)
