"""Tests for loading the TOML configuration with environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdproxy.config import load_settings
from sdproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[[nodes]]
name = "a"
url = "http://127.0.0.1:7861"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


class TestLoadSettings:
    """load_settings reads the file, applies SDPROXY_* overrides and names every problem."""

    def test_load_example_config(self) -> None:
        """The shipped example is valid and documents two nodes."""
        settings = load_settings(ROOT / "config.example.toml")
        assert [n.name for n in settings.nodes] == ["gpu-a", "gpu-b"]
        assert settings.nodes[0].weight == 2.0
        assert settings.server.port == 7860
        assert settings.api.extension_prefixes == ("controlnet", "adetailer")

    def test_load_defaults(self, tmp_path: Path) -> None:
        """Unset keys take their defaults; the URL loses pydantic's trailing slash."""
        settings = load_settings(write(tmp_path, MINIMAL))
        assert settings.server.host == "127.0.0.1"
        assert settings.nodes[0].base_url == "http://127.0.0.1:7861"
        assert settings.nodes[0].max_batch_size is None

    def test_environment_overrides_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """SDPROXY_SERVER__PORT wins over the file and keeps the file's other keys."""
        monkeypatch.setenv("SDPROXY_SERVER__PORT", "9999")
        path = write(tmp_path, '[server]\nhost = "0.0.0.0"\n' + MINIMAL)
        settings = load_settings(path)
        assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9999)

    def test_environment_replaces_nodes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """SDPROXY_NODES as JSON replaces the file's node list."""
        monkeypatch.setenv("SDPROXY_NODES", '[{"name": "z", "url": "http://127.0.0.1:1"}]')
        assert [n.name for n in load_settings(write(tmp_path, MINIMAL)).nodes] == ["z"]

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (MINIMAL + "colour = 1\n", "colour: unknown key"),
            ("[server]\nprot = 1\n" + MINIMAL, "server.prot: unknown key"),
            (MINIMAL + MINIMAL, "duplicate node name 'a'"),
            ('[[nodes]]\nname = "b"\nurl = "ftp://x"\n', "nodes[0] (b).url: URL scheme"),
            ('[[nodes]]\nname = "b"\nurl = "http://u:p@h:1"\n', "credentials"),
            ('[[nodes]]\nname = "b"\nurl = "http://h:1"\nweight = 0\n', "nodes[0] (b).weight"),
            ('[[nodes]]\nname = "b"\n', "nodes[0] (b).url: required key missing"),
            ("[server]\n", "nodes: required key missing"),
            ("nodes = [", "not valid TOML"),
            ('[api]\nextension_prefixes = ["sdapi"]\n' + MINIMAL, "sdproxy's own path"),
            ('[api]\nextension_prefixes = ["a/b"]\n' + MINIMAL, "not one path segment"),
        ],
    )
    def test_load_rejects(self, tmp_path: Path, text: str, message: str) -> None:
        """A bad file is one ConfigError line naming the file and the key."""
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
        assert str(caught.value).startswith(str(path))
        assert message in str(caught.value)

    def test_load_missing_file(self, tmp_path: Path) -> None:
        """A missing file is a ConfigError, not a traceback."""
        with pytest.raises(ConfigError, match="no such file"):
            load_settings(tmp_path / "absent.toml")
