"""Chat templates: render messages into prompt segments, markup apart from user content."""

from __future__ import annotations

import time
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from allinone.backends.base import BackendError, Prompt, Segment


def hf_token_ids(tokenizer: Any, segments: tuple[Segment, ...]) -> list[int]:
    """Token ids of prompt segments with a Hugging Face tokenizer: markup segments may be
    control tokens, user content never becomes one (no injected ``<|im_end|>``)."""
    out: list[int] = []
    for seg in segments:
        out += tokenizer(seg.text, add_special_tokens=False, split_special_tokens=not seg.special)[
            "input_ids"
        ]
    return out


# Used when a model carries no chat template: ChatML, which Qwen and many small models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Private-use characters mark where message contents go in the rendered template, so the
# template markup can be tokenized with control tokens and the contents without.
_MARK = "\ue000{}\ue001"


def _raise(message: str) -> None:
    raise BackendError(f"chat template error: {message}")


class ChatTemplate:
    """A model's Jinja chat template (Hugging Face conventions), rendered in a sandbox."""

    def __init__(self, source: str | None, bos: tuple[str, bool] = ("", False)) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.source = source or CHATML_TEMPLATE
        self._template = env.from_string(self.source)
        self._bos = bos

    def render(
        self,
        messages: list[dict[str, Any]],
        n_prefix_messages: int,
        tools: list[dict] | None = None,
    ) -> Prompt:
        """Messages -> a Prompt whose prefix holds the first ``n_prefix_messages`` messages.

        Each message's text ``content`` becomes a segment of its own, never parsed for control
        tokens; everything the template writes around it (roles, tool definitions, earlier tool
        calls) is markup. Jinja's ``tojson`` escapes ``<``, ``>`` and ``&``, so a tool
        definition or call argument cannot spell a control token either."""
        marked = []
        for i, m in enumerate(messages):
            mm = dict(m)
            if m.get("content"):
                mm["content"] = _MARK.format(i)
            marked.append(mm)
        bos_text, add_bos = self._bos
        extra = {"tools": tools} if tools else {}
        rendered = self._template.render(
            messages=marked, add_generation_prompt=True, bos_token=bos_text, eos_token="", **extra
        )
        if add_bos and bos_text and not rendered.startswith(bos_text):
            rendered = bos_text + rendered
        segments: list[Segment] = []
        rest = rendered
        for i, m in enumerate(messages):
            if not m.get("content"):
                segments += [Segment("", special=True), Segment("", special=False)]
                continue
            mark = _MARK.format(i)
            head, sep, rest = rest.partition(mark)
            if not sep:
                raise BackendError(
                    f"the model's chat template dropped message {i} (role {m['role']!r}); "
                    "this model may not support that role"
                )
            segments.append(Segment(head, special=True))
            segments.append(Segment(m["content"], special=False))
        segments.append(Segment(rest, special=True))
        # The prefix ends with the markup that opens the first message after it.
        cut = 2 * n_prefix_messages + 1 if n_prefix_messages else 0
        return Prompt(prefix=tuple(segments[:cut]), body=tuple(segments[cut:]))
