"""The one Server-Sent Events encoder (WHATWG HTML, "server-sent events": ``event:`` and
``data:`` lines, a blank line after each event)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

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


def event_stream(
    frames: AsyncIterator[str], on_close: Callable[[], Any] | None = None
) -> StreamingResponse:
    """The HTTP response that sends ``frames`` (encoded events) as they come. ``on_close``
    runs after the response, also when the client left before the first frame (a generator's
    own cleanup runs only once it has started): it frees the engine work."""
    background = BackgroundTask(on_close) if on_close is not None else None
    return StreamingResponse(frames, media_type=MEDIA_TYPE, headers=HEADERS, background=background)
