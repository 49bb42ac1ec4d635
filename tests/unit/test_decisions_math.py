"""Decision answers from label log-probabilities: formulas checked against published examples."""

import math

import pytest

from allinone.api.decisions_protocol import DecisionRequest
from allinone.api.routes.decisions import render_input
from allinone.decisions import (
    Answer,
    DecisionError,
    Option,
    Question,
    answer_from_logprobs,
    choice_texts,
    labels_of,
    option_codes,
    question_block,
)


def _choice(n):
    return Question("choice", "?", tuple(Option(f"o{k}") for k in range(n)))


def _score(n):
    return Question("score", "?", tuple(Option(f"l{k}") for k in range(n)))


def test_jev_confidence_reproduces_typesafes_examples():
    # spec section 3.4: {0.88, 0.12, 0} -> 0.82 (published 0.81); score {0, .95, .05} -> 0.925
    assert Answer(_choice(3), [0.88, 0.12, 0.0], 1).confidence == pytest.approx(0.82)
    assert Answer(_score(3), [0.0, 0.95, 0.05], 1).confidence == pytest.approx(0.925)
    real = Answer(_choice(4), [0.54, 0.43, 0.03, 0.0], 1)  # a recorded Jev answer: 0.39
    assert real.confidence == pytest.approx(0.387, abs=1e-3)
    # two options: 2 p_max - 1 for both kinds; one option: 1
    assert Answer(_choice(2), [0.82, 0.18], 1).confidence == pytest.approx(0.64)
    assert Answer(_score(2), [0.3, 0.7], 1).confidence == pytest.approx(0.4)
    assert Answer(Question("choice", "?", (Option("a"),)), [1.0], 1).confidence == 1.0
    assert Answer(_choice(4), [0.25] * 4, 1).confidence == 0.0


def test_score_is_the_expected_level_index():
    a = Answer(_score(4), [0.1, 0.3, 0.5, 0.1], 1)
    assert a.score == pytest.approx(1.6)
    assert a.confidence == pytest.approx(0.4)  # spec 3.7's worked example


def test_option_codes_are_letters_then_two_letters_of_one_length():
    assert option_codes(3) == ["A", "B", "C"]
    assert option_codes(26)[-1] == "Z"
    codes = option_codes(255)
    assert len(set(codes)) == 255 and {len(c) for c in codes} == {2}
    with pytest.raises(DecisionError):
        option_codes(677)


def test_predicate_aliases_are_summed_and_label_mass_reported():
    q = Question("predicate", "It rains.", statement=True)
    labels, owner = labels_of(q)
    assert labels == ["yes", "Yes", "no", "No"] and owner == [0, 0, 1, 1]
    lp = [math.log(0.3), math.log(0.2), math.log(0.1), math.log(0.1)]
    a = answer_from_logprobs(q, lp)
    assert a.probability_true == pytest.approx(0.5 / 0.7)
    assert a.label_mass == pytest.approx(0.7)


def test_extreme_log_probabilities_stay_finite():
    a = answer_from_logprobs(_choice(3), [-1e4, -3.0, -1e30])
    assert all(math.isfinite(p) for p in a.probabilities)
    assert sum(a.probabilities) == pytest.approx(1) and a.top == 1


def test_blocks_list_codes_descriptions_and_the_answer_rule():
    q = Question("choice", "Team?", (Option('"billing"', "money"), Option("true")))
    assert question_block(q) == (
        'Question: Team?\nA: "billing" - money\nB: true\nAnswer with the letter of one option only.'
    )
    assert question_block(_score(3)).splitlines()[1] == "0: l0"
    assert "two-letter" in question_block(_choice(30))


def test_openai_input_items_flatten_in_order():
    body = DecisionRequest.model_validate(
        {
            "model": "m",
            "questions": [{"type": "predicate", "instructions": "x"}],
            "input": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "hi"},
                        {"type": "input_json", "data": {"a": "é"}},
                    ],
                },
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
            ],
        }
    )
    assert render_input(body.input) == (
        'system: be brief\n\nhi\n{"a":"é"}\n\ntool call f (c1): {}\n\ntool output (c1): 42'
    )


def test_choice_values_are_plain_text_unless_a_boolean_could_be_confused():
    assert choice_texts(["billing", "物流"]) == ["billing", "物流"]
    assert choice_texts(["a", True, "true"]) == ['"a"', "true", '"true"']
    assert choice_texts(["True", "no"]) == ['"True"', '"no"']
