"""JSON as every wire protocol reads it: an object whose strings are text any encoder can write.

`json.loads` accepts `"\\ud800"` and returns a string with a lone surrogate in it. Such a string
fails only later, wherever it is first encoded (a reply echoing a context id, a log line, a
key comparison), far from the client that sent it. So it is refused here, as malformed input,
together with NaN and Infinity, which are not JSON either.
"""

from __future__ import annotations

import json
import re
from typing import Any

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidJson(ValueError):
    pass


def _reject_constant(name: str) -> None:
    raise InvalidJson(f"{name} is not JSON")


def loads_object(data: str | bytes, *, strict_text: bool = True) -> dict[str, Any]:
    """One JSON object; InvalidJson (a ValueError) says why not.

    strict_text=False leaves the strings to a later `check_text`, for a protocol that names the
    request in its error (which needs the parsed object first).
    """
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidJson("nested too deeply") from None
    except UnicodeDecodeError:
        raise InvalidJson("not UTF-8") from None
    except ValueError as exc:  # also over-long integers
        raise InvalidJson(str(exc)[:200]) from None
    if not isinstance(value, dict):
        raise InvalidJson(f"expected a JSON object, got {type(value).__name__}")
    if strict_text:
        check_text(value)
    return value


def check_text(value: Any) -> None:
    """Raises InvalidJson when a string anywhere in `value` holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                raise InvalidJson("a string holds a lone surrogate (\\ud800-\\udfff), which is not text")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
