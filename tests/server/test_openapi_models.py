"""/openapi.json's request bodies come from the table sdproxy parses them with."""

from __future__ import annotations

from sdproxy.config import Settings
from sdproxy.core.webui_model import IMG2IMG_FIELDS, TXT2IMG_FIELDS
from sdproxy.server.app import create_app
from sdproxy.server.openapi import build_document

SETTINGS = Settings.model_validate(
    {"server": {"max_width": 1024, "max_steps": 80}, "nodes": [{"name": "n", "url": "http://n"}]}
)


class TestRequestSchemas:
    """The documented fields, defaults, nullability and bounds are the parser's own."""

    def test_every_model_field_in_schema_order(self) -> None:
        """Txt2ImgRequest and Img2ImgRequest list the webui model's fields, in its order."""
        schemas = build_document(create_app(SETTINGS))["components"]["schemas"]
        assert list(schemas["Txt2ImgRequest"]["properties"]) == [s.name for s in TXT2IMG_FIELDS]
        assert list(schemas["Img2ImgRequest"]["properties"]) == [s.name for s in IMG2IMG_FIELDS]
        assert schemas["Img2ImgRequest"]["required"] == ["init_images"]

    def test_defaults_nullability_and_bounds(self) -> None:
        """Null is documented only where sdproxy takes it; bounds follow the settings."""
        fields = build_document(create_app(SETTINGS))["components"]["schemas"]["Txt2ImgRequest"]
        width, seed = fields["properties"]["width"], fields["properties"]["seed"]
        assert width == {"type": "integer", "minimum": 1, "maximum": 1024, "default": 512}
        assert seed["nullable"] is True
        assert (seed["minimum"], seed["maximum"], seed["default"]) == (-(2**63), 2**64 - 1, -1)
        assert fields["properties"]["steps"]["maximum"] == 80
        assert "nullable" not in fields["properties"]["send_images"]
        assert fields["properties"]["sampler_name"] == {
            "type": "string",
            "nullable": True,
            "default": None,
        }
