"""uvicorn's httptools HTTP/1.1 protocol with the limits it lacks: header size and count, and the
time a client may take to send its headers or its body.

uvicorn bounds none of these with httptools (``h11_max_incomplete_event_size`` is h11's only, and
answers 400): one 1 MiB header, 8 MiB of headers or 20,000 headers were read and served, and a
client trickling its headers or body held its connection open for ever. This subclass answers

- 431 ``request_header_fields_too_large`` for more than ``max_header_bytes`` of request line and
  headers, more than ``max_headers`` fields or one field over ``max_header_line_bytes``;
- 414 ``uri_too_long`` for a request target over ``max_header_line_bytes``;
- 408 ``request_timeout`` when the request line and headers take longer than
  ``header_timeout_s`` (counted from connecting, or from the request's first byte on a kept-alive
  connection; a connection that sent nothing is closed without an answer), or when the client
  pauses longer than ``body_timeout_s`` while sending the body;

each as JSON in the OpenAI error envelope (the path, which picks TypeSafe's shape, may not even
have arrived), with ``Connection: close``. The answer is followed by a lingering close (nginx's):
the server stops writing, then reads and drops what the client still sends for up to
``LINGER_S`` seconds, so a client that is still sending reads the answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from allinone.errors import envelope
from allinone.settings import ServerSettings

log = logging.getLogger(__name__)

# How long a refused connection keeps reading (and dropping) before it is closed.
LINGER_S = 2.0


@dataclass(frozen=True)
class HttpLimits:
    """Limits on one HTTP/1.1 request before it reaches the app (bytes, counts, seconds)."""

    max_header_bytes: int = 65536
    max_header_line_bytes: int = 16384
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, server: ServerSettings) -> HttpLimits:
        """The limits set in ``server`` (``ALLINONE_MAX_HEADER_BYTES`` ...)."""
        return cls(
            max_header_bytes=server.max_header_bytes,
            max_header_line_bytes=server.max_header_line_bytes,
            max_headers=server.max_headers,
            header_timeout_s=server.header_timeout_s,
            body_timeout_s=server.body_timeout_s,
        )


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; answered by ``send_400_response``."""

    def __init__(self, status: int, code: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.reason, self.message = status, code, reason, message


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header limits and header/body timeouts (see the module docstring).
    Use :func:`http_protocol` to bind the limits; uvicorn builds one instance per connection."""

    limits: ClassVar[HttpLimits] = HttpLimits()
    # Each called with a fixed reason ("header_limit", "header_timeout", "body_timeout",
    # "bad_http") for each refused request or connection: the metrics' rejected counter.
    refusal_listeners: ClassVar[tuple[Callable[[str], None], ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_headers = True  # between requests or inside a request's line and headers
        self._header_bytes = 0  # bytes received while reading headers (the request line too)
        self._header_count = 0
        self._message_begun = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_seen = 0.0  # loop time of the last body bytes
        self._refusal: _Refused | None = None
        self._lingering = False
        self._linger_timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered and closing: drop what the client still sends
        if self._reading_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # A header still incomplete (httptools buffers it until the next one starts) is bounded
        # here, by the bytes received since the request began.
        if (
            self._reading_headers
            and self._header_bytes > self.limits.max_header_bytes
            and not self._lingering
            and not self.transport.is_closing()
        ):
            self._answer(self._headers_too_large())

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parse error, which a refusal raised in a callback also is."""
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            refusal = _Refused(400, "invalid_http", "bad_http", "the request is not valid HTTP/1.1")
        self._answer(refusal)

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_begun = True
        self._header_count = 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        limit = self.limits.max_header_line_bytes
        if len(self.url) > limit:
            self._raise(
                _Refused(
                    414,
                    "uri_too_long",
                    "header_limit",
                    f"the request target is over {limit} bytes (ALLINONE_MAX_HEADER_LINE_BYTES); "
                    "send a shorter URL",
                )
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._raise(
                _Refused(
                    431,
                    "request_header_fields_too_large",
                    "header_limit",
                    f"the request has more than {self.limits.max_headers} header fields "
                    "(ALLINONE_MAX_HEADERS); send fewer",
                )
            )
        limit = self.limits.max_header_line_bytes
        if len(name) + len(value) > limit:
            self._raise(
                _Refused(
                    431,
                    "request_header_fields_too_large",
                    "header_limit",
                    f"a header field is over {limit} bytes (ALLINONE_MAX_HEADER_LINE_BYTES); "
                    "send a shorter one",
                )
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._cancel_header_timer()
        # The exact size: the bytes counted in data_received may include a body in the same read.
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._raise(self._headers_too_large())
        super().on_headers_complete()
        if not self.parser.should_upgrade():
            self._body_seen = self.loop.time()
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)

    def on_body(self, body: bytes) -> None:
        self._body_seen = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        self._reading_headers = True
        self._header_bytes = 0
        self._message_begun = False
        super().on_message_complete()

    # -- timeouts -----------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._header_timeout
            )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._lingering:
            return
        busy = self.cycle is not None and not self.cycle.response_complete
        if not self._message_begun or busy:
            # Nothing sent yet (an idle connection), or an answer to an earlier request is
            # still being written (pipelining): close without an answer.
            self._notify("header_timeout")
            self.transport.close()
            return
        timeout = self.limits.header_timeout_s
        self._answer(
            _Refused(
                408,
                "request_timeout",
                "header_timeout",
                f"the request's line and headers took longer than {timeout:g} s "
                "(ALLINONE_HEADER_TIMEOUT_S); send them at once",
            )
        )

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self._lingering:
            return
        timeout = self.limits.body_timeout_s
        idle = self.loop.time() - self._body_seen
        if idle < timeout or self.flow.read_paused:
            # Body bytes came meanwhile, or the app is slow to take them (not the client's
            # fault): wait again.
            wait = timeout - idle if idle < timeout else timeout
            self._body_timer = self.loop.call_later(wait, self._body_timeout)
            return
        cycle = self.cycle
        refusal = _Refused(
            408,
            "request_timeout",
            "body_timeout",
            f"the request body stalled for {timeout:g} s (ALLINONE_BODY_TIMEOUT_S); "
            "send it without pauses",
        )
        if cycle is not None and cycle.response_started:
            self._notify(refusal.reason)
            self.transport.close()  # an answer is already under way: only closing is left
            return
        if cycle is not None:
            # The app waits for the body: it now reads a disconnect, and what it may still send
            # is dropped (uvicorn's cycle ignores sends once disconnected).
            cycle.disconnected = True
            cycle.message_event.set()
        self._answer(refusal)

    # -- answering ----------------------------------------------------------------------------

    def _headers_too_large(self) -> _Refused:
        limit = self.limits.max_header_bytes
        return _Refused(
            431,
            "request_header_fields_too_large",
            "header_limit",
            f"the request line and headers are over {limit} bytes (ALLINONE_MAX_HEADER_BYTES); "
            "send fewer or shorter headers",
        )

    def _raise(self, refusal: _Refused) -> None:
        # httptools turns an exception in a callback into HttpParserCallbackError, on which
        # uvicorn calls send_400_response: remember what to answer instead.
        self._refusal = refusal
        raise refusal

    def _notify(self, reason: str) -> None:
        for listener in self.refusal_listeners:
            try:
                listener(reason)
            except Exception:  # metrics must never break the connection handling
                log.exception("a refusal listener failed")

    def _answer(self, refusal: _Refused) -> None:
        """Write ``refusal`` as a JSON error with Connection: close, then close lingeringly."""
        self._cancel_timers()
        self._notify(refusal.reason)
        if self.transport.is_closing():
            return
        body = json.dumps(envelope(refusal.message, "invalid_request_error", refusal.code)).encode()
        head = [STATUS_LINE[refusal.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
            b"x-content-type-options: nosniff\r\n",
        ]
        if refusal.status != 408:
            head.append(b"x-should-retry: false\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head) + body)
        self._lingering = True
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)


def http_protocol(
    limits: HttpLimits, on_refuse: Callable[[str], None] | None = None
) -> type[asyncio.Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` enforcing ``limits``; ``on_refuse`` is
    called with a fixed reason for every refused request or connection."""
    return type(
        "AllinoneHttpProtocol",
        (LimitedHttpToolsProtocol,),
        {"limits": limits, "refusal_listeners": (on_refuse,) if on_refuse else ()},
    )
