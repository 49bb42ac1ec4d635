"""A request's scope: its deadline, the server's drain and the client's hang-up bound every
wait, and every engine handle it started is cancelled when it ends (vLLM's
``with_cancellation``, llama.cpp's ``server_response_reader``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from allinone.backends.base import Finished, RequestHandle, TokenLogprob

if TYPE_CHECKING:
    from allinone.api.state import ServerState

T = TypeVar("T")


@dataclass(frozen=True)
class TextDelta:
    """The engine's next piece of a reply's text."""

    text: str


@dataclass(frozen=True)
class LogprobsDelta:
    """Log-probabilities of the tokens whose text comes next (requests that asked for them)."""

    entries: list[TokenLogprob]


@dataclass(frozen=True)
class Done:
    """The reply ended: why, its usage and its whole result."""

    finished: Finished


EngineEvent = TextDelta | LogprobsDelta | Done
"""What a handle reports, in order: text and logprobs deltas, then one Done. A failure is
raised from the iteration (the engine's exception, mapped by ``allinone.errors``)."""


class RequestScope:
    """One request's bounds and handle group.

    ``what`` names the work in timeout messages ("the reply"); ``input_param`` is the API
    family's input field, given to input errors that name none (``messages``, ``input``).
    Use as ``async with RequestScope(...) as scope``: leaving it, by return, error, timeout,
    drain or hang-up, cancels every handle added, and the engine frees their sequences at
    its next step."""

    def __init__(
        self,
        state: ServerState,
        request: Any = None,
        what: str = "the reply",
        input_param: str | None = None,
    ) -> None:
        self.state = state
        self.request = request
        self.what = what
        self.deadline = time.monotonic() + state.settings.server.request_timeout_s
        self.handles: list[RequestHandle] = []
        if input_param is not None and request is not None:
            request.state.input_param = input_param

    def add(self, handles: Iterable[RequestHandle]) -> list[RequestHandle]:
        """Track ``handles`` (cancelled when the scope ends); returns them as a list."""
        added = list(handles)
        self.handles.extend(added)
        return added

    async def run(self, work: Awaitable[T], what: str | None = None) -> T:
        """Await ``work`` within the scope's bounds: 504 past the deadline, 503 at the drain
        deadline, 499 when the client hangs up (``ServerState.bounded``)."""
        return await self.state.admission.bounded(
            work, what or self.what, self.deadline, self.request
        )

    async def wait_all(self, handles: list[RequestHandle] | None = None) -> list[Finished]:
        """Every handle's Finished (default: all added), in order, within the bounds."""
        todo = self.handles if handles is None else handles
        return await self.run(asyncio.gather(*(h.result_async() for h in todo)))

    async def events(self, handle: RequestHandle) -> AsyncIterator[EngineEvent]:
        """``handle``'s events, typed, each wait within the scope's deadline and drain (a
        stream's client hang-up ends the response generator instead)."""
        async for kind, value in self.state.admission.bounded_iter(
            handle.aevents(), self.what, self.deadline
        ):
            if kind == "text":
                yield TextDelta(value)
            elif kind == "logprobs":
                yield LogprobsDelta(value)
            else:
                yield Done(value)

    def close(self) -> None:
        """Cancel every handle added (a no-op for finished ones)."""
        for handle in self.handles:
            handle.cancel()

    async def __aenter__(self) -> RequestScope:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
