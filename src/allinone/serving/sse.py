"""The one Server-Sent Events encoder (WHATWG HTML, "server-sent events": ``event:`` and
``data:`` lines, a blank line after each event)."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"
"""OpenAI's end-of-stream sentinel (chat and completions streams)."""

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Headers of every event stream: no caching, and no buffering in a proxy such as nginx."""

MEDIA_TYPE = "text/event-stream"


def sse(data: Any, event: str | None = None) -> str:
    """One event: ``data`` as JSON (non-ASCII kept; a str is sent as it is), with an
    ``event:`` line when ``event`` is given (Anthropic's and the Responses streams name every
    event; OpenAI's chat stream names none)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n"
