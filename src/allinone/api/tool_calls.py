"""Tool calls in the Hermes format that Qwen2.5's chat template teaches its models.

The template (from the GGUF) renders the tool definitions and earlier calls; the model answers
a call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. This module turns
such replies into OpenAI ``tool_calls`` (whole or while streaming) and, when a call is required,
writes the llguidance grammar that forces one: the tags, then JSON valid under a schema that
names the function and embeds its own ``parameters`` schema (llguidance's ``%json``), so the
arguments always parse and validate.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from allinone.api.json_text import invalid_text
from allinone.api.protocol import FunctionCall, ToolCall, ToolDefinition

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def template_speaks_tools(source: str | None) -> bool:
    """Whether a chat template renders ``tools`` in the Hermes ``<tool_call>`` format."""
    return bool(source) and "tools" in source and OPEN in source  # type: ignore[operator]


def required_call_grammar(
    tools: list[ToolDefinition], only: str | None = None, tag_ids: tuple[int, int] | None = None
) -> str:
    """Lark source (llguidance) for a reply that is exactly one call (of ``only``, or of any
    of ``tools``), in the template's own format
    (``<tool_call>\n{"name": "<f>", "arguments": <JSON>}\n</tool_call>``), with each
    function's ``parameters`` embedded as the root of its own ``%json`` (so its ``$ref``s
    resolve). ``tag_ids``: the token ids of the two tags when each is one special
    token of the vocabulary (Qwen2.5's are): the grammar then names those tokens, which the
    model emits, instead of spelling the tags out byte by byte.

    One call, not several: forced into the tags, the 0.5B default model does not end its turn
    after a call but starts another until ``max_tokens`` (measured: three ``add`` calls for
    "Add 2 and 3"); parallel calls come under ``tool_choice: "auto"``, as the model writes them."""
    open_, close = (
        (f"<[{tag_ids[0]}]>", f"<[{tag_ids[1]}]>")
        if tag_ids
        else (
            json.dumps(OPEN),
            json.dumps(CLOSE),
        )
    )
    rules: list[str] = []
    for t in tools:
        f = t.function
        if only is not None and f.name != only:
            continue
        head = open_ + " " + json.dumps(f'\n{{"name": "{f.name}", "arguments": ')
        tail = json.dumps("}\n") + " " + close
        params = json.dumps(f.parameters or {"type": "object"})
        rules.append(f"call_{len(rules)}: {head} %json {params} {tail}")
    alternatives = " | ".join(f"call_{i}" for i in range(len(rules)))
    return "\n".join(["start: call", f"call: {alternatives}", *rules]) + "\n"


def new_call_id() -> str:
    """A fresh tool-call id (OpenAI's ``call_`` prefix)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Strict JSON: NaN and Infinity (which Python's decoder takes) would make arguments that a
# client's JSON parser cannot read back.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _one_call(obj: Any, names: set[str]) -> ToolCall | None:
    """A ToolCall from one call object (``{"name", "arguments"}``, or OpenAI's
    ``{"type": "function", "function": {...}}``), or None when it is not a call of a known
    function with an object of arguments."""
    if isinstance(obj, dict) and "name" not in obj and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name") if isinstance(obj, dict) else None
    if not isinstance(name, str) or name not in names:  # (a list is not even hashable)
        return None
    # Llama-style and some Qwen replies name the arguments "parameters"; neither key: no arguments
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = _DECODER.decode(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict) or invalid_text(args) is not None:
        return None  # (a "\ud800" escape: not text a client's JSON parser takes)
    arguments = json.dumps(args, ensure_ascii=False)
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))


def _calls_in(text: str, names: set[str]) -> list[ToolCall] | None:
    """Every call in ``text`` when it holds nothing but calls, else None (never some of them).

    The forms models write: one call object; several one after another (one per line,
    pretty-printed, or comma-separated); a JSON array of them; any of these in Markdown fences.
    """
    calls: list[ToolCall] = []
    i, n = 0, len(text)
    while True:
        while i < n and (text[i].isspace() or text[i] == ","):
            i += 1
        if i == n:
            return calls or None
        if text.startswith(FENCE, i):
            nl = text.find("\n", i)
            end = text.find(FENCE, nl) if nl >= 0 else -1
            fenced = _calls_in(text[nl + 1 : end if end >= 0 else n], names) if nl >= 0 else None
            if fenced is None:
                return None
            calls += fenced
            i = end + len(FENCE) if end >= 0 else n
            continue
        try:
            value, i = _DECODER.raw_decode(text, i)
        except (ValueError, RecursionError):  # not JSON, or nested past the decoder's limit
            return None
        for item in value if isinstance(value, list) else [value]:
            call = _one_call(item, names)
            if call is None:
                return None
            calls.append(call)


def parse_tool_calls(
    text: str, names: set[str], max_calls: int | None = None
) -> tuple[str | None, list[ToolCall]]:
    """Split a whole reply into its content (None when nothing but calls) and its tool calls.

    Calls come in ``<tool_call>`` blocks (a block may hold several), or, for a reply that is
    nothing but calls, bare (see ``ToolCallStream``). The tags never reach the content: a closed
    block that is not a well-formed call of a known function leaves its text as content, without
    the tags; a block the reply never closed and that is not a whole call (cut by ``max_tokens``
    or a stop string) is dropped, since half a call cannot be run. A reply without calls or tags
    is returned as it is. ``max_calls``: keep at most this many calls (1 for
    ``parallel_tool_calls: false``); the rest are dropped, not run."""
    stream = ToolCallStream(names, max_calls)
    events = stream.feed(text) + stream.finish()
    calls = [v for k, v in events if k == "call"]
    content = "".join(v for k, v in events if k == "content")
    if not calls and content == text:
        return text, []
    return (content.strip() or None), calls


@dataclass
class ToolCallStream:
    """Splits streamed reply text into content pieces and finished tool calls.

    ``feed`` returns events ``("content", str)`` and ``("call", ToolCall)``; text that may be
    the start of a tag is held until it is known, a block until it closes, and whitespace
    between calls is not reported as content. The tags themselves are never content (a stray
    ``</tool_call>`` is dropped too); see ``parse_tool_calls`` for blocks that are not calls."""

    names: set[str]
    max_calls: int | None = None  # calls past this many are dropped (not run)
    buf: str = ""
    inside: bool = False
    pending_space: str = ""
    n_calls: int = 0
    bare: bool | None = None  # the reply opened with "{", "[{" or a fence around one: maybe calls

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        out: list[tuple[str, Any]] = []
        if self.bare is None:
            # Small models often answer with bare call objects, without the tags, sometimes
            # inside a Markdown fence (llama.cpp's Hermes parser accepts both): such a reply is
            # held whole and judged when it ends.
            self.bare = _opens_bare_call(self.buf)
        if self.bare is not False:
            return out
        while True:
            if not self.inside:
                at, tag = _first_tag(self.buf)
                if at < 0:
                    keep = max(_partial_suffix(self.buf, OPEN), _partial_suffix(self.buf, CLOSE))
                    self._content(self.buf[: len(self.buf) - keep], out)
                    self.buf = self.buf[len(self.buf) - keep :]
                    return out
                self._content(self.buf[:at], out)
                self.buf = self.buf[at + len(tag) :]
                self.inside = tag == OPEN  # a close tag with no open one is dropped
                continue
            end = self.buf.find(CLOSE)
            if end < 0:
                return out
            self._block(self.buf[:end], out)
            self.buf, self.inside = self.buf[end + len(CLOSE) :], False

    def finish(self) -> list[tuple[str, Any]]:
        """Events for what is left when the reply ends. A last block without its close tag
        counts when it holds whole calls, and is dropped otherwise (a cut call)."""
        out: list[tuple[str, Any]] = []
        if self.bare is not False:  # held whole (or too short to tell): calls, or text
            calls = _calls_in(self.buf, self.names) if self.bare else None
            self.bare = False
            if calls is not None:
                self.buf = ""
                self._calls(calls, out)
                return out
            return self.feed("") + self.finish()
        if self.inside:
            body = self.buf[: len(self.buf) - _partial_suffix(self.buf, CLOSE)]
            calls = _calls_in(body, self.names)
            if calls is not None:
                self._calls(calls, out)
        else:
            # A reply cut inside a tag (spelled in several tokens) ends with the start of one:
            # markup, not text.
            keep = max(_partial_suffix(self.buf, OPEN), _partial_suffix(self.buf, CLOSE))
            self._content(self.buf[: len(self.buf) - keep], out)
            if self.pending_space and not self.n_calls:
                out.append(("content", self.pending_space))
        self.buf, self.inside, self.pending_space = "", False, ""
        return out

    def _content(self, text: str, out: list[tuple[str, Any]]) -> None:
        # Trailing whitespace waits: it is content only if more text follows, not a call.
        body = text.rstrip()
        if body:
            out.append(("content", self.pending_space + body))
            self.pending_space = ""
        self.pending_space += text[len(body) :]

    def _block(self, body: str, out: list[tuple[str, Any]]) -> None:
        calls = _calls_in(body, self.names)
        if calls is None:  # not a call: its text is the reply's, the tags are not
            self._content(body.strip("\n"), out)
            return
        self._calls(calls, out)

    def _calls(self, calls: list[ToolCall], out: list[tuple[str, Any]]) -> None:
        if self.max_calls is not None:  # parallel_tool_calls false: the first call only
            calls = calls[: max(self.max_calls - self.n_calls, 0)]
        self.n_calls += len(calls)
        self.pending_space = ""
        out.extend(("call", c) for c in calls)


FENCE = "```"


def _first_tag(text: str) -> tuple[int, str]:
    """Where the first ``<tool_call>`` or ``</tool_call>`` in ``text`` starts, and which
    (-1 when neither is there)."""
    found = [(at, tag) for tag in (OPEN, CLOSE) if (at := text.find(tag)) >= 0]
    return min(found) if found else (-1, "")


def _opens_bare_call(text: str) -> bool | None:
    """Whether a reply's start may be calls without tags: ``{``, ``[{``, or a fence whose
    first line of content starts so; None while the text so far cannot tell."""
    s = text.lstrip()
    if not s:
        return None
    if not s.startswith(FENCE):
        return _opens_json_call(s)
    nl = s.find("\n")
    if nl < 0:
        return None if len(s) <= 16 else False  # "```json" and the like, or code
    rest = s[nl + 1 :].lstrip()
    return _opens_json_call(rest) if rest else None


def _opens_json_call(s: str) -> bool | None:
    """``s`` (not empty, no leading space) starts with ``{`` or ``[{``; None: cannot tell yet."""
    if s.startswith("{"):
        return True
    if FENCE.startswith(s):
        return None
    if not s.startswith("["):
        return False
    rest = s[1:].lstrip()
    return rest.startswith("{") if rest else None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
