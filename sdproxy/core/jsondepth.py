"""Pure: how deeply a decoded JSON body nests, checked without recursion.

sdproxy re-encodes the bodies it forwards (orjson refuses more than 255 levels) and walks
parts of them (image URLs, scripts): a body nested deeper than ``MAX_DEPTH`` is refused with a
422 the moment it is decoded, before anything else looks at it. The webui has no such limit
but nothing it accepts comes close: ControlNet units, the deepest real input, nest 4 levels.
"""

from __future__ import annotations

from typing import Any

from sdproxy.errors import validation_error

MAX_DEPTH = 64  # containers inside containers, the body itself counting as 1


def depth_error(body: Any, limit: int = MAX_DEPTH) -> dict[str, Any] | None:
    """A 422 item at the first container nested deeper than ``limit``; None if none is.

    Iterative and linear in the size of the body; scalars are never pushed on the stack.
    """
    if not isinstance(body, dict | list):
        return None
    stack: list[tuple[list[str | int], Any]] = [(["body"], body)]
    while stack:
        loc, value = stack.pop()
        if len(loc) > limit:  # loc holds "body" plus one step per container above this one
            return validation_error(
                loc,
                f"ensure this value is nested at most {limit} levels deep",
                "value_error.json.depth",
                limit_value=limit,
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        stack.extend(([*loc, key], item) for key, item in items if isinstance(item, dict | list))
    return None
