"""The one text rule for JSON request bodies: every string a client sends, at any depth and
object keys included, must be valid Unicode.

JSON can spell what no text is: an escape such as ``\\ud800`` (or the raw bytes of one) decodes
to a lone surrogate, which cannot be encoded as UTF-8, so it fails wherever it is tokenized,
hashed, logged or written back in a reply or an error message. Typed text fields check this
themselves (``protocol.Text``), but much of a body is free JSON (tool schemas, arguments,
``metadata``, TypeSafe's ``state`` and criteria keys, ``input_json`` data). ``check_json_text``
checks the whole decoded body once, for every JSON route, before the route's own validation:
400 (TypeSafe's 422 on ``/v1/systemone``) naming the field's JSON path."""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

# A body without these cannot hold a lone surrogate, so most bodies are not walked: an escape
# of a surrogate (paired ones included, which ASCII-only encoders write for emoji), the UTF-8
# bytes of one (which Python's JSON decoder lets through), or NUL (a UTF-16/32 body).
_SUSPECT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]|\x00")


def unicode_problem(value: str) -> str | None:
    """What makes ``value`` not valid Unicode text (None when it is): a lone surrogate, which a
    JSON escape such as ``\\ud800`` decodes to and which cannot be encoded as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains an unpaired surrogate (U+{ord(value[exc.start]):04X} at character "
            f"{exc.start}), which is not valid Unicode text; send UTF-8 text (a "
            "\\ud83d\\ude00-style escape must come as a complete pair)"
        )
    return None


def invalid_text(value: Any) -> tuple[tuple[str | int, ...], str, str] | None:
    """The first string (or object key) in decoded JSON ``value`` that is not valid Unicode:
    (its path, what is wrong, the string with the bad characters escaped); None when all are.
    Walks depth-first in document order, without recursion (any depth)."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            problem = unicode_problem(v)
            if problem is not None:
                return path, problem, escaped(v)
        elif isinstance(v, dict):
            items = []
            for key, item in v.items():
                problem = unicode_problem(key)
                if problem is not None:
                    return (*path, escaped(key)), f"this object key {problem}", escaped(key)
                items.append(((*path, key), item))
            stack.extend(reversed(items))
        elif isinstance(v, list):
            stack.extend(((*path, i), item) for i, item in reversed(list(enumerate(v))))
    return None


def escaped(text: str) -> str:
    """``text`` with characters UTF-8 cannot encode written as ``\\udxxx`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_json(request: Request) -> bool:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return ctype == "application/json" or ctype.endswith("+json")


async def check_json_text(request: Request) -> None:
    """A route dependency: RequestValidationError (answered as the route family's 400/422) when
    any string of a JSON body is not valid Unicode. Bodies that are not JSON, or not valid
    JSON, are left to the route (its own validation answers them)."""
    if not _is_json(request):
        return
    body = await request.body()
    if not body or _SUSPECT.search(body) is None:
        return
    try:
        data = await request.json()  # FastAPI has decoded it already: this is its cached copy
    except (ValueError, RecursionError):
        return
    found = invalid_text(data)
    if found is None:
        return
    path, problem, shown = found
    raise RequestValidationError(
        [{"type": "value_error", "loc": ("body", *path), "msg": problem, "input": shown}]
    )
