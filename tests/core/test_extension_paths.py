"""Tests for the path an extension route forwards: dot segments and encoded separators refused."""

from __future__ import annotations

import pytest

from sdproxy.core.extension_paths import extension_path
from tests.support import PATH_ESCAPES as ESCAPES


class TestExtensionPath:
    """extension_path() reads the raw path and refuses what could resolve elsewhere."""

    @pytest.mark.parametrize("raw", ESCAPES)
    def test_escapes_are_refused(self, raw: str) -> None:
        """Dot segments, encoded separators, empty segments, controls and bad escapes: None."""
        assert extension_path(raw, "controlnet") is None

    @pytest.mark.parametrize(
        ("raw", "forwarded"),
        [
            ("/controlnet/model_list", "controlnet/model_list"),
            ("/controlnet/model_list?update=true", "controlnet/model_list"),
            ("/controlnet/a%20b", "controlnet/a b"),
            ("/controlnet/%252e%252e/x", "controlnet/%2e%2e/x"),  # a literal "%2e%2e" name
            ("/controlnet/", "controlnet/"),
            ("/%63ontrolnet/x", "controlnet/x"),
        ],
    )
    def test_plain_paths_are_forwarded(self, raw: str, forwarded: str) -> None:
        """Ordinary paths come out decoded, to be joined (and encoded again) by NodeClient."""
        assert extension_path(raw, "controlnet") == forwarded

    def test_other_prefix_is_refused(self) -> None:
        """The first segment must be the route's own prefix."""
        assert extension_path("/adetailer/x", "controlnet") is None
