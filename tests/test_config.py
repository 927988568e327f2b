"""Tests for loading the TOML configuration with environment overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trustme
from pydantic import BaseModel

from sdproxy.config import (
    ApiSettings,
    AutosaveSettings,
    BenchmarkSettings,
    NodeSettings,
    SchedulerSettings,
    ServerSettings,
    load_settings,
)
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

    @pytest.mark.parametrize(
        "section",
        [
            ServerSettings,
            SchedulerSettings,
            BenchmarkSettings,
            ApiSettings,
            AutosaveSettings,
            NodeSettings,
        ],
    )
    def test_every_option_in_example(self, section: type[BaseModel]) -> None:
        """Each field appears as a key (set or commented out) in the example."""
        text = (ROOT / "config.example.toml").read_text()
        missing = [name for name in section.model_fields if f"{name} =" not in text]
        assert missing == []


NODE_JSON = '[{"name": "z", "url": "http://127.0.0.1:1"}]'


class TestEnvironment:
    """SDPROXY_* variables: comma lists where a list is obvious, and one line per mistake."""

    @pytest.mark.parametrize(
        ("variable", "value", "read"),
        [
            ("SDPROXY_SERVER__API_KEYS", "key-one-123,key-two-456", ["key-one-123", "key-two-456"]),
            ("SDPROXY_SERVER__API_KEYS", '["key-one-123"]', ["key-one-123"]),
            ("SDPROXY_SERVER__API_KEYS", "", []),
            ("SDPROXY_BENCHMARK__BATCH_SIZES", "1,4", (1, 4)),
            ("SDPROXY_BENCHMARK__BATCH_SIZES", " 2 , 8 ", (2, 8)),
            ("SDPROXY_API__EXTENSION_PREFIXES", "controlnet,tagger", ("controlnet", "tagger")),
            ("SDPROXY_SERVER__PORT", "8080", 8080),
            ("sdproxy_server__port", "8081", 8081),
            ("SDPROXY_SERVER", '{"port": 8082, "host": "0.0.0.0"}', 8082),
        ],
    )
    def test_environment_values_read(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        variable: str,
        value: str,
        read: object,
    ) -> None:
        """JSON or comma-separated lists, plain scalars, and whole sections as JSON."""
        monkeypatch.setenv(variable, value)
        settings = load_settings(write(tmp_path, MINIMAL))
        section, _, key = variable.lower().removeprefix("sdproxy_").partition("__")
        got = getattr(getattr(settings, section), key or "port")
        if key == "api_keys":
            got = [secret.get_secret_value() for secret in got]
        assert got == read

    @pytest.mark.parametrize(
        ("variable", "value", "message"),
        [
            ("SDPROXY_NODES", "not json", "SDPROXY_NODES: not valid JSON (Expecting value"),
            ("SDPROXY_NODES", "[1]", "SDPROXY_NODES: nodes[0]: expected a JSON object"),
            ("SDPROXY_NODES", "{}", "SDPROXY_NODES: nodes: Input should be a valid list"),
            (
                "SDPROXY_NODES",
                '[{"name": "x", "url": "http://h:1"}, {"name": "x", "url": "http://h:2"}]',
                "SDPROXY_NODES: nodes[1] (x).name: duplicate node name 'x' (nodes[0] has it",
            ),
            (
                "SDPROXY_NODES",
                '[{"name": "x", "url": "ftp://h"}]',
                "SDPROXY_NODES: nodes[0] (x).url: URL scheme",
            ),
            ("SDPROXY_SERVER__API_KEYS", "abc", "SDPROXY_SERVER__API_KEYS: server.api_keys: key 1"),
            ("SDPROXY_SERVER__API_KEYS", '["abc', "SDPROXY_SERVER__API_KEYS: not valid JSON"),
            ("SDPROXY_BENCHMARK__BATCH_SIZES", "4,4", "SDPROXY_BENCHMARK__BATCH_SIZES: benchmark"),
            ("SDPROXY_BENCHMARK__BATCH_SIZES", "1,x", "benchmark.batch_sizes.1: Input should be"),
            ("SDPROXY_SERVER__PORT", "high", "SDPROXY_SERVER__PORT: server.port: Input should"),
            ("SDPROXY_SERVER__PROT", "1", "SDPROXY_SERVER__PROT: server.prot: unknown key"),
            ("SDPROXY_SERVR__PORT", "1", "SDPROXY_SERVR__PORT: unknown section 'servr'"),
            ("SDPROXY_SERVER", "5", "SDPROXY_SERVER: give a JSON object of [server] keys"),
            ("SDPROXY_SERVER", "{", "SDPROXY_SERVER: not valid JSON"),
        ],
    )
    def test_environment_errors_name_the_variable(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        variable: str,
        value: str,
        message: str,
    ) -> None:
        """A bad variable is blamed on itself, not on the file, and its value is not shown."""
        monkeypatch.setenv(variable, value)
        path = write(tmp_path, MINIMAL)
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
        text = str(caught.value)
        assert message in text
        assert text.startswith(variable)
        assert str(path) not in text
        assert "\n" not in text
        assert caught.value.__cause__ is None

    def test_secret_values_are_never_echoed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A node list that is not JSON holds a password: the error names only the variable."""
        monkeypatch.setenv("SDPROXY_NODES", f'[{{"name": "a", "password": "{SECRET}"')
        with pytest.raises(ConfigError) as caught:
            load_settings(None)
        assert SECRET not in str(caught.value)
        assert str(caught.value).startswith("SDPROXY_NODES: not valid JSON")

    def test_file_errors_still_name_the_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a good variable set, a bad file key is still the file's."""
        monkeypatch.setenv("SDPROXY_SERVER__PORT", "8080")
        path = write(tmp_path, "[server]\nhost = 1\n" + MINIMAL)
        with pytest.raises(ConfigError, match=r"^.*config\.toml: server\.host: Input should"):
            load_settings(path)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("nodes = [1]\n", "nodes[0]: expected a table of keys"),
            (
                'nodes = [1, {name = "b", url = "http://h:1"}]\n',
                "nodes[0]: expected a table of keys",
            ),
            (MINIMAL + MINIMAL, "nodes[1] (a).name: duplicate node name 'a' (nodes[0] has it too)"),
            ("nodes = 3\n", "nodes: Input should be a valid list"),
        ],
    )
    def test_odd_node_lists_in_the_file(self, tmp_path: Path, text: str, message: str) -> None:
        """Entries that are not tables, and duplicate names, name the entry and its key."""
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
        assert str(caught.value) == f"{path}: {message}"

    def test_environment_only_without_nodes(self) -> None:
        """No file and no SDPROXY_NODES: the line says how to give nodes."""
        with pytest.raises(
            ConfigError, match=r"environment: nodes: required key missing .*SDPROXY_NODES"
        ):
            load_settings(None)

    def test_other_sdproxy_variables_are_not_settings(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """SDPROXY_CONFIG (the healthcheck's) and the like are left alone."""
        monkeypatch.setenv("SDPROXY_CONFIG", "/etc/sdproxy/config.toml")
        monkeypatch.setenv("SDPROXY_NODES", NODE_JSON)
        assert [n.name for n in load_settings(None).nodes] == ["z"]


class TestStateFile:
    """Where benchmark results are kept: state_dir, else beside the file, else nowhere."""

    def test_state_dir_holds_the_default_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """SDPROXY_BENCHMARK__STATE_DIR (the image sets it) holds sdproxy-state.json."""
        monkeypatch.setenv("SDPROXY_BENCHMARK__STATE_DIR", str(tmp_path / "state"))
        monkeypatch.setenv("SDPROXY_NODES", NODE_JSON)
        settings = load_settings(None)
        assert settings.benchmark.state_file == tmp_path / "state" / "sdproxy-state.json"
        path = write(tmp_path, '[benchmark]\nstate_file = "x.json"\n' + MINIMAL)
        assert load_settings(path).benchmark.state_file == tmp_path / "state" / "x.json"

    def test_absolute_state_file_wins(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An absolute state_file in the file is kept whatever the state directory."""
        monkeypatch.setenv("SDPROXY_BENCHMARK__STATE_DIR", str(tmp_path / "state"))
        target = tmp_path / "mine.json"
        path = write(tmp_path, f'[benchmark]\nstate_file = "{target}"\n' + MINIMAL)
        assert load_settings(path).benchmark.state_file == target

    def test_environment_only_keeps_no_state_without_a_dir(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No file and no state_dir: nowhere to keep results (none is kept)."""
        monkeypatch.setenv("SDPROXY_NODES", NODE_JSON)
        assert load_settings(None).benchmark.state_file is None
