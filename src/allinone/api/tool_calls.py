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


def _to_call(body: str, names: set[str]) -> ToolCall | None:
    """A ToolCall from one block's JSON, or None when it is not a call of a known function."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    arguments = json.dumps(args, ensure_ascii=False)
    return ToolCall(id=new_call_id(), function=FunctionCall(name=obj["name"], arguments=arguments))


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """Split a whole reply into its content (None when only calls) and its tool calls.

    A block that is not a well-formed call of a known function leaves the reply as plain
    content, as vLLM's Hermes parser does: nothing is dropped."""
    stream = ToolCallStream(names)
    events = stream.feed(text) + stream.finish()
    calls = [v for k, v in events if k == "call"]
    content = "".join(v for k, v in events if k == "content")
    if not calls:
        return text, []
    return (content.strip() or None), calls


@dataclass
class ToolCallStream:
    """Splits streamed reply text into content pieces and finished tool calls.

    ``feed`` returns events ``("content", str)`` and ``("call", ToolCall)``; text that may be
    the start of ``<tool_call>`` is held until it is known, and whitespace between calls is
    not reported as content."""

    names: set[str]
    buf: str = ""
    inside: bool = False
    pending_space: str = ""
    n_calls: int = 0
    bare: bool | None = None  # the reply opened with "{" (or a fence around one): maybe calls

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        out: list[tuple[str, Any]] = []
        if self.bare is None:
            # Small models often answer a call as the bare JSON object, without the tags,
            # sometimes inside a Markdown fence (llama.cpp's Hermes parser accepts both): such
            # a reply is held whole and judged when it ends.
            self.bare = _opens_bare_call(self.buf)
        if self.bare is not False:
            return out
        while True:
            if not self.inside:
                at = self.buf.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buf, OPEN)
                    self._content(self.buf[: len(self.buf) - keep], out)
                    self.buf = self.buf[len(self.buf) - keep :]
                    return out
                self._content(self.buf[:at], out)
                self.buf, self.inside = self.buf[at + len(OPEN) :], True
            end = self.buf.find(CLOSE)
            if end < 0:
                return out
            self._block(self.buf[:end], out)
            self.buf, self.inside = self.buf[end + len(CLOSE) :], False

    def finish(self) -> list[tuple[str, Any]]:
        """Events for what is left when the reply ends (a last call may lack its close tag)."""
        out: list[tuple[str, Any]] = []
        if self.bare:
            # one call object, or several, one per line (how the 0.5B model writes them)
            self.bare = False
            body = _unfenced(self.buf)
            lines = [line for line in body.splitlines() if line.strip()]
            whole = _to_call(body, self.names)
            calls = [whole] if whole is not None else [_to_call(x, self.names) for x in lines]
            if calls and all(c is not None for c in calls):
                self.buf = ""
                self.n_calls += len(calls)
                return [("call", c) for c in calls]
            return self.feed("") + self.finish()
        if self.inside:
            self._block(self.buf, out, closed=False)
        else:
            self._content(self.buf, out)
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

    def _block(self, body: str, out: list[tuple[str, Any]], closed: bool = True) -> None:
        call = _to_call(body, self.names)
        if call is None:
            tail = CLOSE if closed else ""
            self._content(OPEN + body + tail, out)
            return
        self.n_calls += 1
        self.pending_space = ""
        out.append(("call", call))


FENCE = "```"


def _opens_bare_call(text: str) -> bool | None:
    """Whether a reply's start may be a call without tags: ``{``, or a fence whose first line
    of content starts with ``{``; None while the text so far cannot tell."""
    s = text.lstrip()
    if not s:
        return None
    if s.startswith("{"):
        return True
    if not s.startswith(FENCE):
        return None if FENCE.startswith(s) else False
    nl = s.find("\n")
    if nl < 0:
        return None if len(s) <= 16 else False  # "```json" and the like, or code
    rest = s[nl + 1 :].lstrip()
    return rest.startswith("{") if rest else None


def _unfenced(text: str) -> str:
    """``text`` without a Markdown fence around it (the text itself when it has none)."""
    s = text.strip()
    if not s.startswith(FENCE):
        return text
    body = s.split("\n", 1)[1].rstrip() if "\n" in s else ""
    return body[: -len(FENCE)] if body.endswith(FENCE) else body


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
