"""Settings and load_settings(): the only place that reads the configuration file."""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sdproxy.environment import DUPLICATE_NAME, describe_validation_error, read_environment
from sdproxy.errors import ConfigError

_file_data: ContextVar[dict[str, Any] | None] = ContextVar("_file_data", default=None)
_environment_data: ContextVar[dict[str, Any] | None] = ContextVar("_environment_data", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """Where sdproxy listens and what it accepts from clients."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 7860
    # Client authentication (sdproxy/auth.py); no credentials configured means open.
    api_auth: SecretStr | None = None  # "user:pass,user2:pass2", as the webui's --api-auth
    api_keys: list[SecretStr] = []  # accepted as "Authorization: Bearer <key>"
    public_status: bool = False  # GET /cluster, /cluster/*, /metrics without credentials
    # What a generation request may ask for.
    max_body_mb: Annotated[float, Field(gt=0)] = 64.0
    max_images_per_request: Annotated[int, Field(ge=1)] = 1000
    max_width: Annotated[int, Field(ge=1)] = 4096
    max_height: Annotated[int, Field(ge=1)] = 4096
    max_steps: Annotated[int, Field(ge=1)] = 500
    max_input_megapixels: Annotated[float, Field(gt=0)] = 50.0  # each init image and mask
    max_request_megapixels: Annotated[float, Field(gt=0)] = 100.0  # all of them together
    image_decode_threads: Annotated[int, Field(ge=1)] = 2  # init images decoded at once
    allow_image_urls: bool = False
    # Connection-level limits of the HTTP server.
    max_line_size: Annotated[int, Field(ge=256)] = 8190
    max_field_size: Annotated[int, Field(ge=256)] = 8190
    max_headers: Annotated[int, Field(ge=8)] = 128
    keepalive_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    body_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    shutdown_grace_s: Annotated[float, Field(gt=0)] = 30.0
    log_format: Literal["text", "json"] = "text"

    @field_validator("api_auth")
    @classmethod
    def _user_pass_list(cls, value: SecretStr | None) -> SecretStr | None:
        # Messages name the entry by position only: the text holds passwords.
        if value is None:
            return None
        for index, entry in enumerate(value.get_secret_value().split(","), start=1):
            user, colon, _ = entry.partition(":")
            if not colon or not user:
                raise ValueError(f"entry {index} is not user:password")
        return value

    @field_validator("api_keys")
    @classmethod
    def _non_empty_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for index, key in enumerate(keys, start=1):
            if len(key.get_secret_value().strip()) < 8:
                raise ValueError(f"key {index} is shorter than 8 characters")
        return keys

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class SchedulerSettings(_Section):
    """How long sdproxy waits for nodes, and how hard it tries before giving up."""

    request_timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    share_timeout_factor: Annotated[float, Field(ge=1)] = 3.0
    share_timeout_floor_s: Annotated[float, Field(gt=0)] = 600.0
    max_redispatches: Annotated[int, Field(ge=0)] = 3
    wait_for_node_s: Annotated[float, Field(ge=0)] = 30.0
    health_interval_s: Annotated[float, Field(gt=0)] = 5.0
    health_timeout_s: Annotated[float, Field(gt=0)] = 3.0
    inventory_every_polls: Annotated[int, Field(ge=1)] = 12
    cooldown_base_s: Annotated[float, Field(gt=0)] = 2.0
    cooldown_max_s: Annotated[float, Field(gt=0)] = 60.0
    max_queued_images: Annotated[int, Field(ge=1)] = 4000
    work_stealing: bool = True  # an idle node takes over waiting work it finishes earlier
    # A request whose client went away: "interrupt" its running jobs and drop the rest, or
    # "finish" it (its images are autosaved). Unset: "finish" with autosave on, else "interrupt".
    on_disconnect: Literal["interrupt", "finish"] | None = None
    # What sdproxy reads of a node's answer before it counts the node as failed: a generation
    # may take this many bytes per pixel of every image it can return (core/answers.py), any
    # other call (and a selectable script's generation, at least) max_node_answer_mb.
    node_answer_bytes_per_pixel: Annotated[float, Field(gt=0)] = 8.0
    max_node_answer_mb: Annotated[float, Field(gt=0)] = 512.0
    node_accept_encoding: Literal["identity", "gzip"] = "identity"

    @property
    def max_node_answer_bytes(self) -> int:
        return int(self.max_node_answer_mb * 1024 * 1024)


class BenchmarkSettings(_Section):
    """The standard payload every node is timed on, and where the results are kept."""

    prompt: str = "A herd of cows grazing at the bottom of a sunny valley"
    steps: Annotated[int, Field(ge=1)] = 20
    width: Annotated[int, Field(ge=8)] = 512
    height: Annotated[int, Field(ge=8)] = 512
    batch_sizes: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (1, 4)
    warmup_runs: Annotated[int, Field(ge=0)] = 1
    timed_runs: Annotated[int, Field(ge=1)] = 3
    state_file: Path | None = None  # None: sdproxy-state.json in state_dir
    state_dir: Path | None = None  # None: the configuration file's directory
    on_start: bool = True  # serve benchmarks, in the background, nodes with no stored result

    @field_validator("batch_sizes")
    @classmethod
    def _two_sizes(cls, sizes: tuple[int, int]) -> tuple[int, int]:
        if sizes[0] == sizes[1]:
            raise ValueError("give two different batch sizes (they fit overhead and slope)")
        return (min(sizes), max(sizes))


_RESERVED_PREFIXES = frozenset(
    {"sdapi", "cluster", "internal", "metrics", "openapi.json", "docs", "redoc"}
)


class ApiSettings(_Section):
    """The webui API beyond generation: timeouts of node calls and forwarded extension routes."""

    read_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    write_timeout_s: Annotated[float, Field(gt=0)] = 600.0  # POST options waits for a model load
    extension_prefixes: tuple[str, ...] = ("controlnet", "adetailer")
    # override_settings naming a checkpoint no node has: rendered on the loaded one, as a webui
    # does (false), or refused with 404 (true).
    strict_checkpoints: bool = False

    @field_validator("extension_prefixes")
    @classmethod
    def _plain_prefixes(cls, prefixes: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in prefixes:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", prefix):
                raise ValueError(f'{prefix!r} is not one path segment (e.g. "controlnet")')
            if prefix in _RESERVED_PREFIXES:
                raise ValueError(f"{prefix!r} is sdproxy's own path")
        return prefixes


class AutosaveSettings(_Section):
    """Where every image returned to a client is also written as PNG ("" = off)."""

    dir: str = ""

    @property
    def path(self) -> Path | None:
        return Path(self.dir) if self.dir.strip() else None


class NodeSettings(_Section):
    """One webui node behind sdproxy."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    url: AnyHttpUrl
    weight: Annotated[float, Field(gt=0)] = 1.0
    max_batch_size: Annotated[int | None, Field(ge=1)] = None
    max_pixels: Annotated[int | None, Field(ge=1)] = None  # batch x width x height per request
    # HTTP Basic towards the node (its --api-auth); the password may come from a variable.
    username: str | None = None
    password: SecretStr | None = None
    password_env: Annotated[str | None, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = None
    # https nodes: verify the certificate (against ca_file if given, else the system's CAs).
    verify_tls: bool = True
    ca_file: FilePath | None = None

    @field_validator("url")
    @classmethod
    def _plain_base_url(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        if url.query or url.fragment:
            raise ValueError("a node URL takes no query or fragment")
        if url.username or url.password:
            raise ValueError("put credentials in username/password, not in the URL")
        return url

    @field_validator("ca_file")
    @classmethod
    def _loadable_ca(cls, path: Path | None) -> Path | None:
        if path is not None:
            try:
                ssl.create_default_context(cafile=str(path))
            except (ssl.SSLError, OSError):
                raise ValueError(f"{path} holds no readable PEM certificate") from None
        return path

    @model_validator(mode="before")
    @classmethod
    def _password_from_environment(cls, data: Any) -> Any:
        # Read here, at load time, so a missing variable is a configuration error.
        if not isinstance(data, dict) or not data.get("password_env"):
            return data
        if data.get("password") is not None:
            raise ValueError("give password or password_env, not both")
        variable = data["password_env"]
        if not isinstance(variable, str) or variable not in os.environ:
            raise ValueError(f"password_env: environment variable {variable!r} is not set")
        return {**data, "password": os.environ[variable]}

    @model_validator(mode="after")
    def _consistent(self) -> NodeSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.username is not None and ":" in self.username:
            raise ValueError("username: HTTP Basic user names cannot contain ':'")
        if self.url.scheme != "https" and (self.ca_file is not None or not self.verify_tls):
            raise ValueError("verify_tls and ca_file apply to https:// nodes only")
        if self.ca_file is not None and not self.verify_tls:
            raise ValueError("ca_file is given but verify_tls = false")
        return self

    @property
    def base_url(self) -> str:
        """The URL without pydantic's trailing slash, for yarl to join paths onto."""
        return str(self.url).rstrip("/")


# --- [cluster]: several replicas sharing state in Redis (sdproxy/shared/) ---------------------
class ClusterSettings(_Section):
    """Replicas sharing state in Redis; without redis_url, one process with state in memory."""

    redis_url: SecretStr | None = None  # redis://[user:password@]host:6379/0, rediss://, unix://
    redis_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")] = "sdproxy"
    replica_id: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,100}$")] = None
    lease_ttl_s: Annotated[float, Field(ge=1, le=60)] = 5.0
    redis_timeout_s: Annotated[float, Field(gt=0, le=30)] = 1.0  # at most lease_ttl_s / 3
    on_redis_down: Literal["local", "refuse"] = "local"

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSettings:
        # Messages never repeat the URL: it may hold the Redis password.
        url = self.redis_url.get_secret_value() if self.redis_url else "redis://"
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url: give a redis://, rediss:// or unix:// URL")
        if self.redis_timeout_s * 3 > self.lease_ttl_s:  # a renewal must fit in a third
            raise ValueError("redis_timeout_s must be at most a third of lease_ttl_s")
        return self

    @property
    def shared(self) -> bool:
        return self.redis_url is not None


class Settings(BaseSettings):
    """Everything sdproxy is configured with. Environment variables override the file."""

    model_config = SettingsConfigDict(
        env_prefix="SDPROXY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    benchmark: BenchmarkSettings = BenchmarkSettings()
    api: ApiSettings = ApiSettings()
    autosave: AutosaveSettings = AutosaveSettings()
    cluster: ClusterSettings = ClusterSettings()
    nodes: Annotated[list[NodeSettings], Field(min_length=1)]

    @field_validator("nodes")
    @classmethod
    def _unique_names(cls, nodes: list[NodeSettings]) -> list[NodeSettings]:
        seen: dict[str, int] = {}
        for index, node in enumerate(nodes):
            if node.name in seen:
                raise PydanticCustomError(
                    DUPLICATE_NAME,
                    "duplicate node name '{name}' (nodes[{first}] has it too)",
                    {"index": index, "first": seen[node.name], "name": node.name},
                )
            seen[node.name] = index
        return nodes

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: arguments, then SDPROXY_* variables, then the TOML file. The
        # variables are read by environment.py, not pydantic-settings' own source, so that a
        # value that is not JSON is one clear error and comma lists work.
        return init_settings, _EnvironmentSource(settings_cls), _FileSource(settings_cls)


# The sections SDPROXY_<SECTION>__<KEY> may set, and their models (for list-valued keys).
SECTIONS: dict[str, type[BaseModel]] = {
    name: kind
    for name, field in Settings.model_fields.items()
    if isinstance(kind := field.annotation, type) and issubclass(kind, BaseModel)
}


class _FileSource(PydanticBaseSettingsSource):
    """The parsed TOML file, handed over by load_settings() through a context variable."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_file_data.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_data.get() or {})


class _EnvironmentSource(PydanticBaseSettingsSource):
    """The SDPROXY_* variables as settings data (environment.read_environment)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        given = _environment_data.get()
        return dict(given if given is not None else read_environment(os.environ, SECTIONS).data)


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Read ``path`` (TOML), apply ``SDPROXY_*`` environment overrides, validate.

    Raises ConfigError with one line naming where the bad value came from (the file, or the
    environment variable), the key and what is wrong.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    environment = read_environment(os.environ, SECTIONS)
    file_token = _file_data.set(data)
    env_token = _environment_data.set(environment.data)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        # from None: pydantic's own text repeats the input values, passwords included.
        raise ConfigError(describe_validation_error(exc, data, environment, path)) from None
    finally:
        _environment_data.reset(env_token)
        _file_data.reset(file_token)
    return _with_state_file(settings, path)


DEFAULT_STATE_FILE = "sdproxy-state.json"


def _with_state_file(settings: Settings, config_path: Path | None) -> Settings:
    """The benchmark state file, resolved against state_dir or the configuration's directory.

    None (results are not kept) only when neither is known: no state_dir and no file.
    """
    bench = settings.benchmark
    state = bench.state_file or Path(DEFAULT_STATE_FILE)
    if not state.is_absolute():
        base = bench.state_dir
        if base is None and config_path is not None:
            base = config_path.resolve().parent
        if base is None:
            return settings
        state = base / state
    benchmark = bench.model_copy(update={"state_file": state})
    return settings.model_copy(update={"benchmark": benchmark})
