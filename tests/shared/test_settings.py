"""The [cluster] section: Redis URL as a secret, environment override, checked limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdproxy.config import ClusterSettings, load_settings
from sdproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent.parent
NODES = '[[nodes]]\nname = "a"\nurl = "http://127.0.0.1:7861"\n'
SECRET = "s3cret-redis-pass"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text + NODES)
    return path


class TestClusterSettings:
    """[cluster] is optional, checked, and never repeats the Redis password."""

    def test_cluster_default_single_process(self, tmp_path: Path) -> None:
        """Without [cluster] there is no Redis: one process, as before."""
        settings = load_settings(write(tmp_path, ""))
        assert not settings.cluster.shared
        assert settings.cluster.redis_prefix == "sdproxy"
        assert settings.cluster.lease_ttl_s <= 10
        assert settings.cluster.on_redis_down == "local"

    def test_cluster_url_from_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """SDPROXY_CLUSTER__REDIS_URL sets the URL and wins over the file; it stays secret."""
        path = write(tmp_path, '[cluster]\nredis_url = "redis://file:6379/0"\nredis_prefix = "x"\n')
        monkeypatch.setenv("SDPROXY_CLUSTER__REDIS_URL", f"redis://:{SECRET}@env:6379/1")
        settings = load_settings(path)
        assert settings.cluster.redis_url is not None
        assert settings.cluster.redis_url.get_secret_value() == f"redis://:{SECRET}@env:6379/1"
        assert settings.cluster.redis_prefix == "x"  # the rest of the file still applies
        assert SECRET not in repr(settings)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (f'redis_url = "http://:{SECRET}@h/0"', "cluster: redis_url: give a redis"),
            ('redis_prefix = "a b"', "cluster.redis_prefix: String should match"),
            ('replica_id = "r/1"', "cluster.replica_id: String should match"),
            ("lease_ttl_s = 0.5", "cluster.lease_ttl_s: Input should be greater than or equal"),
            ("lease_ttl_s = 2\nredis_timeout_s = 1", "cluster: redis_timeout_s must be at most"),
            ('on_redis_down = "ignore"', "cluster.on_redis_down: Input should be"),
            ("redis_password = 1", "cluster.redis_password: unknown key"),
        ],
    )
    def test_cluster_bad_values_named(self, tmp_path: Path, text: str, message: str) -> None:
        """Each bad value is an error naming its key, without the secret."""
        with pytest.raises(ConfigError) as caught:
            load_settings(write(tmp_path, f"[cluster]\n{text}\n"))
        assert message in str(caught.value)
        assert SECRET not in str(caught.value)

    def test_cluster_every_option_in_example(self) -> None:
        """config.example.toml documents every [cluster] key."""
        text = (ROOT / "config.example.toml").read_text()
        section = text[text.index("[cluster]") :]
        missing = [name for name in ClusterSettings.model_fields if f"{name} =" not in section]
        assert missing == []
