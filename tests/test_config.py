"""Tests for loading the TOML configuration with environment overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trustme
from pydantic import BaseModel

from sdproxy.config import NodeSettings, SchedulerSettings, ServerSettings, load_settings
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


SECRET = "s3cret-value-XYZ"


def node_toml(extra: str, url: str = "http://127.0.0.1:7861") -> str:
    return f'[[nodes]]\nname = "a"\nurl = "{url}"\n{extra}\n'


class TestSecretsInConfig:
    """Credentials load from the file or the environment and never show in text."""

    def test_node_password_from_password_env(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """password_env names a variable read at load time; repr shows no password."""
        monkeypatch.setenv("GPU_A_PASSWORD", SECRET)
        path = write(tmp_path, node_toml('username = "sd"\npassword_env = "GPU_A_PASSWORD"'))
        settings = load_settings(path)
        password = settings.nodes[0].password
        assert password is not None
        assert password.get_secret_value() == SECRET
        assert SECRET not in repr(settings)
        assert SECRET not in str(settings.model_dump())

    def test_credentials_from_environment_json_and_variables(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """SDPROXY_NODES carries node passwords; SDPROXY_SERVER__API_AUTH/API_KEYS the clients'."""
        node = {"name": "z", "url": "http://h:1", "username": "sd", "password": SECRET}
        monkeypatch.setenv("SDPROXY_NODES", f"[{json.dumps(node)}]")
        monkeypatch.setenv("SDPROXY_SERVER__API_AUTH", f"user:{SECRET}")
        monkeypatch.setenv("SDPROXY_SERVER__API_KEYS", json.dumps([SECRET]))
        settings = load_settings(write(tmp_path, "[server]\nport = 1234\n" + MINIMAL))
        assert settings.server.port == 1234
        assert settings.server.api_auth is not None
        assert settings.server.api_auth.get_secret_value() == f"user:{SECRET}"
        assert [key.get_secret_value() for key in settings.server.api_keys] == [SECRET]
        password = settings.nodes[0].password
        assert password is not None
        assert password.get_secret_value() == SECRET

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (f'[server]\napi_auth = "{SECRET}"\n' + MINIMAL, "entry 1 is not user:password"),
            (f'[server]\napi_auth = "a:b,{SECRET}"\n' + MINIMAL, "entry 2 is not user:password"),
            ('[server]\napi_keys = ["short"]\n' + MINIMAL, "key 1 is shorter"),
            (node_toml("", f"http://u:{SECRET}@h:1"), "credentials in username/password"),
            (node_toml(f'password = "{SECRET}"'), "username and password go together"),
            (
                node_toml(f'username = "sd"\npassword = "{SECRET}"\npassword_env = "X"'),
                "password or password_env",
            ),
            (node_toml('username = "sd"\npassword_env = "SDPROXY_TEST_UNSET"'), "is not set"),
            (node_toml("verify_tls = false"), "https:// nodes only"),
            (node_toml("verify_tls = false", "https://h:1") + 'ca_file = "CA"', "verify_tls"),
            (node_toml('ca_file = "NOTPEM"', "https://h:1"), "no readable PEM"),
        ],
    )
    def test_rejects_without_echoing_secrets(self, tmp_path: Path, text: str, message: str) -> None:
        """Bad credential settings name the key and the problem, never the secret."""
        (tmp_path / "notpem.txt").write_text("not a certificate")
        ca = tmp_path / "ca.pem"
        trustme.CA().cert_pem.write_to_path(str(ca))
        text = text.replace("NOTPEM", str(tmp_path / "notpem.txt")).replace('"CA"', f'"{ca}"')
        with pytest.raises(ConfigError) as caught:
            load_settings(write(tmp_path, text))
        assert message in str(caught.value)
        assert SECRET not in str(caught.value)
        assert caught.value.__cause__ is None
        assert caught.value.__suppress_context__


class TestExampleDocumentsEverything:
    """config.example.toml names every option, so users can find each one."""

    @pytest.mark.parametrize("section", [ServerSettings, SchedulerSettings, NodeSettings])
    def test_every_option_in_example(self, section: type[BaseModel]) -> None:
        """Each field appears as a key (set or commented out) in the example."""
        text = (ROOT / "config.example.toml").read_text()
        missing = [name for name in section.model_fields if f"{name} =" not in text]
        assert missing == []
