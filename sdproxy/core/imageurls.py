"""Pure: image URLs in request bodies, refused with a 422 item each (sdproxy fetches nothing).

The webui fetches an image given as an http(s) URL instead of decoding it; sdproxy's nodes fetch
nothing for clients, so these checks refuse URLs unless ``server.allow_image_urls`` is set.
"""

from __future__ import annotations

from typing import Any

from sdproxy.errors import validation_error

# Fields the webui decodes as images, fetching http(s) URLs when given one.
IMAGE_FIELDS = ("init_images", "mask", "latent_mask", "firstpass_image")
# Fields whose nested values scripts (ControlNet units, ReActor, ...) may decode as images.
SCRIPT_FIELDS = ("alwayson_scripts", "script_args")


def is_url(value: Any) -> bool:
    """Whether ``value`` is a string the webui would fetch as a URL instead of decoding."""
    return isinstance(value, str) and value.lstrip()[:8].lower().startswith(("http://", "https://"))


def image_url_errors(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A 422 item for every image given as a URL: sdproxy's nodes fetch nothing for clients."""
    found: list[list[str | int]] = []
    for name in IMAGE_FIELDS:
        value = body.get(name)
        if isinstance(value, list):
            found.extend(["body", name, index] for index, item in enumerate(value) if is_url(item))
        elif is_url(value):
            found.append(["body", name])
    # Scripts take positional and nested arguments: walk them all.
    found.extend(_url_locations([(["body", n], body[n]) for n in SCRIPT_FIELDS if n in body]))
    return _url_errors(found)


def any_url_errors(body: Any) -> list[dict[str, Any]]:
    """A 422 item for every URL anywhere in ``body``: for routes whose image fields vary
    (extras, png-info, interrogate, extension routes such as ControlNet's detect)."""
    return _url_errors(_url_locations([(["body"], body)]))


def _url_locations(start: list[tuple[list[str | int], Any]]) -> list[list[str | int]]:
    """Where URLs sit in nested JSON, walked iteratively (any depth, no recursion)."""
    found: list[list[str | int]] = []
    stack = list(start)
    while stack:
        loc, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(([*loc, str(key)], item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend(([*loc, index], item) for index, item in enumerate(value))
        elif is_url(value):
            found.append(loc)
    return found


def _url_errors(locations: list[list[str | int]]) -> list[dict[str, Any]]:
    return [
        validation_error(
            loc,
            "image URLs are not accepted: send the image as base64 or a data URI",
            "value_error.url.not_allowed",
        )
        for loc in sorted(locations, key=str)
    ]
