"""Chat templates: render messages into prompt segments, markup apart from user content."""

from __future__ import annotations

import time

from jinja2.sandbox import ImmutableSandboxedEnvironment

from allinone.backends.base import BackendError, Prompt, Segment

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
        self._template = env.from_string(source or CHATML_TEMPLATE)
        self._bos = bos

    def render(self, messages: list[dict[str, str]], n_prefix_messages: int) -> Prompt:
        """Messages -> a Prompt whose prefix holds the first ``n_prefix_messages`` messages."""
        marked = [{"role": m["role"], "content": _MARK.format(i)} for i, m in enumerate(messages)]
        bos_text, add_bos = self._bos
        rendered = self._template.render(
            messages=marked, add_generation_prompt=True, bos_token=bos_text, eos_token=""
        )
        if add_bos and bos_text and not rendered.startswith(bos_text):
            rendered = bos_text + rendered
        segments: list[Segment] = []
        rest = rendered
        for i, m in enumerate(messages):
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
