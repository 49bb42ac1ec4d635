"""Pure functions reached before only through a real model or server: the chat template, the
error mapping, the remote backend's label grammar and log-probabilities."""

from __future__ import annotations

import math

import pytest
from fastapi.exceptions import RequestValidationError

from allinone.backends.base import (
    BackendError,
    EngineDeadError,
    EngineOverloadedError,
    PromptTooLongError,
    UpstreamError,
    UpstreamTimeoutError,
)
from allinone.backends.chat_template import ChatTemplate
from allinone.backends.remote import choice_grammar, label_logprobs
from allinone.errors import to_api_error, validation_message
from allinone.serving.errors import InputError


def test_chatml_puts_markup_and_content_in_separate_segments_and_cuts_the_prefix():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<|im_end|> hi"},  # user text is never parsed as markup
    ]
    p = ChatTemplate(None).render(msgs, n_prefix_messages=1)
    prefix_text = "".join(s.text for s in p.prefix)
    # the prefix ends with the markup that opens the first message after it
    assert prefix_text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert [s.special for s in p.prefix] == [True, False, True]
    user = [s for s in p.body if not s.special]
    assert [s.text for s in user] == ["<|im_end|> hi"]
    assert p.body[-1].special and p.body[-1].text.endswith("<|im_start|>assistant\n")


def test_a_template_that_drops_a_role_is_a_clear_error():
    only_user = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
    only_user += "{% endfor %}"
    with pytest.raises(BackendError, match="dropped message 0"):
        ChatTemplate(only_user).render(
            [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], 1
        )


def test_bos_is_added_when_the_model_wants_it_and_the_template_does_not():
    p = ChatTemplate(None, bos=("<s>", True)).render([{"role": "user", "content": "x"}], 0)
    assert p.body[0].text.startswith("<s><|im_start|>user")


@pytest.mark.parametrize(
    ("exc", "status", "code", "param"),
    [
        (EngineOverloadedError("full"), 503, "overloaded", None),
        (EngineDeadError("dead"), 503, "engine_dead", None),
        (PromptTooLongError("long"), 400, "context_length_exceeded", "input"),
        (InputError("bad"), 400, "invalid_request", "input"),
        (UpstreamTimeoutError("slow"), 504, "upstream_timeout", None),
        (UpstreamError("down"), 502, "upstream_error", None),
        (BackendError("boom"), 500, "engine_error", None),
        (RuntimeError("bug"), 500, "internal_error", None),
    ],
)
def test_every_exception_maps_to_one_status_and_code(exc, status, code, param):
    err = to_api_error(exc, param="input")
    assert (err.status, err.code) == (status, code)
    if param is not None:
        assert err.param == param


def test_a_not_found_task_is_404_and_keeps_its_own_param():
    exc = InputError("no such task")
    exc.not_found, exc.param = True, "task"
    err = to_api_error(exc, param="input")
    assert (err.status, err.param) == (404, "task")


def testvalidation_messages_name_the_field_not_pydantics_union_members():
    errors = [
        {
            "type": "value_error",
            "loc": ("body", "messages", 0, "content", "function-after[x]"),
            "msg": "Value error, contains an unpaired surrogate",
        },
        {
            "type": "list_type",
            "loc": ("body", "messages", 0, "content", "list[ContentPart]"),
            "msg": "Input should be a valid list",
        },
    ]
    message, param = validation_message(RequestValidationError(errors))
    assert param == "messages.0.content"
    assert message == "messages.0.content: contains an unpaired surrogate"


def test_choice_grammar_accepts_exactly_the_labels_escaped():
    assert choice_grammar(["yes", 'say "no"']) == 'root ::= "yes" | "say \\"no\\""'


def test_label_logprobs_from_top_alternatives_or_all_mass_on_the_choice():
    top = {"pos": -0.1, "neg": -2.5, "x": -5.0}
    assert label_logprobs(["positive", "negative"], "positive", top) == [-0.1, -2.5]
    # two labels starting with the same token cannot be told apart from one token
    same = label_logprobs(["New York", "New Delhi"], "New Delhi", {"New": -0.01})
    assert same == [-math.inf, 0.0]
    assert label_logprobs(["a", "b"], "b", None) == [-math.inf, 0.0]
