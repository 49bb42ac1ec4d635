"""Decision answers from label log-probabilities: formulas checked against published examples."""

import math

import pytest

from allinone.api.decisions_protocol import DecisionRequest
from allinone.decisions import (
    Answer,
    Option,
    Question,
    answer_from_logprobs,
    choice_texts,
    labels_of,
    option_codes,
    question_block,
)
from allinone.serving.decisions import render_input
from allinone.serving.errors import InputError


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
    with pytest.raises(InputError):
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


# --- strategies: readings and how their log-probabilities combine (hand-computed) ---

from allinone.decision_eval import auc, expected_calibration_error, negation_of  # noqa: E402
from allinone.decisions import (  # noqa: E402
    CLOZE_LABELS_PER_BRANCH,
    CONTRAST_TEMPERATURE,
    QuestionPriors,
    Strategy,
    prior_key,
    read_answer,
    readings,
)


def test_strategy_names_parse_and_unknown_parts_are_refused_by_name():
    assert Strategy.parse("cloze+prior") == Strategy("cloze", permuted=False, prior=True)
    assert Strategy.parse("codes+permuted+prior").name == "codes+permuted+prior"
    assert Strategy.parse("cloze+prior+permuted").name == "cloze+permuted+prior"  # one spelling
    for bad, part in [
        ("letters", "letters"),
        ("cloze+magic", "magic"),
        ("cloze+prior+prior", "prior"),
    ]:
        with pytest.raises(InputError) as e:
            Strategy.parse(bad)
        assert e.value.param == "x_strategy" and part in str(e.value)


def test_cloze_reads_option_texts_and_splits_long_lists_over_branches():
    q = Question("choice", "Which?", (Option("red"), Option("green"), Option("blue")))
    (r,) = readings(q, Strategy("cloze"))
    assert r.labels == ("red", "green", "blue") and r.owner == (0, 1, 2)
    assert "- red\n- green\n- blue" in r.block
    _, rev = readings(q, Strategy("cloze", permuted=True))
    assert rev.block.index("- blue") < rev.block.index("- red") and rev.view == 1
    big = _choice(255)
    rds = readings(big, Strategy("cloze", permuted=True))
    assert len(rds) == math.ceil(255 / CLOZE_LABELS_PER_BRANCH)  # not listed: one view only
    assert "o7" not in rds[0].block  # the options are not listed beyond 26
    assert [i for r in rds for i in r.owner] == list(range(255))


def test_codes_permuted_maps_reversed_letters_back_to_their_options():
    q = _choice(3)
    fwd, rev = readings(q, Strategy("codes", permuted=True))
    assert rev.labels == ("A", "B", "C") and rev.owner == (2, 1, 0)
    assert "A: o2" in rev.block
    # forward says A (o0) at p=.6; reversed says C (= o0) at p=.6: o0 wins, positions cancel
    lp_f = [math.log(0.6), math.log(0.3), math.log(0.1)]
    lp_r = [math.log(0.1), math.log(0.3), math.log(0.6)]
    a = read_answer(q, Strategy("codes", permuted=True), [fwd, rev], [lp_f, lp_r])
    assert a.probabilities == pytest.approx([0.6, 0.3, 0.1])
    # a pure position bias (always A at .6) cancels to a tie between o0 and o2
    b = read_answer(q, Strategy("codes", permuted=True), [fwd, rev], [lp_f, lp_f])
    # log-mean: o0 = (ln.6 + ln.1)/2, o1 = ln.3, o2 = (ln.1 + ln.6)/2, then softmax
    g = math.sqrt(0.6 * 0.1)
    assert b.probabilities == pytest.approx(
        [g / (2 * g + 0.3), 0.3 / (2 * g + 0.3), g / (2 * g + 0.3)]
    )


def test_predicate_swap_reading_and_label_mass_average_over_views():
    q = Question("predicate", "Is it late?")
    one, two = readings(q, Strategy("codes", permuted=True))
    assert one.block.endswith("yes or no only.") and two.block.endswith("no or yes only.")
    # yes/Yes/no/No: view 1 P(yes)=.2+.1, P(no)=.5+.1 (mass .9); view 2 .4/.4 (mass .8)
    v1 = [math.log(x) for x in (0.2, 0.1, 0.5, 0.1)]
    v2 = [math.log(x) for x in (0.3, 0.1, 0.3, 0.1)]
    a = read_answer(q, Strategy("codes", permuted=True), [one, two], [v1, v2])
    t = math.sqrt((0.3 / 0.9) * 0.5)
    f = math.sqrt((0.6 / 0.9) * 0.5)
    assert a.probability_true == pytest.approx(t / (t + f))
    assert a.label_mass == pytest.approx(0.85)


def test_running_prior_subtracts_the_mean_after_min_inputs_and_ignores_repeats():
    priors = QuestionPriors(max_questions=2, window=3, min_inputs=2)
    out, n = priors.correct("q", "x1", [-1.0, -2.0])
    assert (out, n) == ([-1.0, -2.0], 0)  # nothing seen yet
    out, n = priors.correct("q", "x1", [-1.0, -2.0])  # a repeat adds nothing
    assert n == 0
    priors.correct("q", "x2", [-3.0, -0.5])
    out, n = priors.correct("q", "x3", [-2.0, -1.0])
    # the prior is the log of the mean probability over x1 and x2
    p0 = math.log((math.exp(-1.0) + math.exp(-3.0)) / 2)
    p1 = math.log((math.exp(-2.0) + math.exp(-0.5)) / 2)
    assert n == 2 and out == pytest.approx([-2.0 - p0, -1.0 - p1])
    priors.correct("q2", "x", [0.0])
    priors.correct("q3", "x", [0.0])  # the least recently used, "q", is dropped
    assert len(priors) == 2 and priors.correct("q", "x9", [-1.0, -1.0])[1] == 0


def test_content_free_prior_applies_until_the_running_prior_takes_over():
    priors = QuestionPriors(min_inputs=2)
    assert not priors.seeded("q")
    # read on the content-free inputs, the question says option 0 with 0.8 and 0.6
    priors.seed("q", [[math.log(0.8), math.log(0.2)], [math.log(0.6), math.log(0.4)]])
    assert priors.seeded("q")
    out, n = priors.correct("q", "x1", [math.log(0.5), math.log(0.5)])
    # minus the log of the mean content-free probabilities (0.7, 0.3): option 1 now leads
    assert n == 0 and out == pytest.approx([math.log(0.5 / 0.7), math.log(0.5 / 0.3)])
    priors.correct("q", "x2", [math.log(0.9), math.log(0.1)])
    out, n = priors.correct("q", "x3", [math.log(0.5), math.log(0.5)])
    assert n == 2  # two real inputs: their mean (0.7, 0.3) replaces the content-free one
    assert out == pytest.approx([math.log(0.5 / 0.7), math.log(0.5 / 0.3)])


def test_a_models_own_strategy_can_differ_per_question_kind():
    from types import SimpleNamespace

    from allinone.decisions import DecisionService
    from allinone.models.catalog import CATALOG

    backend = SimpleNamespace(capabilities=frozenset({"answer_scoring"}), name="llama_cpp")
    tasks = SimpleNamespace(
        backend=backend, decision_strategy={"*": "cloze+prior", "predicate": "cloze"}
    )
    svc = DecisionService(tasks)
    opts = (Option("a"), Option("b"))
    yes_no, choice = Question("predicate", "Late?"), Question("choice", "Which?", opts)
    assert svc.strategy_for(yes_no).name == "cloze" and svc.strategy_for(choice).name == (
        "cloze+prior"
    )
    # a request's strategy is read for every kind; an engine without whole-answer scoring
    # falls back to the codes default
    assert DecisionService(tasks, Strategy("codes")).strategy_for(yes_no).name == "codes"
    plain = SimpleNamespace(
        backend=SimpleNamespace(capabilities=frozenset(), name="x"),
        decision_strategy=tasks.decision_strategy,
    )
    assert DecisionService(plain).strategy_for(choice) == Strategy(
        "codes", prior=True, contrast=True
    )
    # every catalog model's own strategy parses, names the rest ("*") and keeps one reading
    for entry in CATALOG.values():
        own = dict(entry.decision_strategy)
        if own:
            parsed = [Strategy.parse(v) for v in own.values()]
            assert "*" in own and len({p.reading for p in parsed}) == 1


def test_prior_turns_a_constant_bias_into_balanced_answers():
    # a choice: the running prior takes over after min_inputs
    q = Question("choice", "Is it late?", (Option("late"), Option("on time")))
    st = Strategy("codes", prior=True)
    (r,) = readings(q, st)
    assert r.labels == ("A", "B")
    priors = QuestionPriors(min_inputs=2)
    # the model says "B" to everything, a bit less to the late inputs
    inputs = {"a": 0.3, "b": 0.1, "c": 0.35, "d": 0.05}
    answers = {}
    for key, p_a in inputs.items():
        lps = [math.log(p_a), math.log(1 - p_a)]
        answers[key] = read_answer(q, st, [r], [lps], priors=priors, input_key=key)
    assert answers["a"].prior_inputs == 0 and answers["c"].prior_inputs == 2
    assert answers["c"].top == 0 and answers["d"].top == 1
    # a predicate keeps its content-free prior (here P(yes) 0.2 on content-free inputs)
    yes_no = Question("predicate", "Is it late?")
    (r,) = readings(yes_no, st)
    key = prior_key(st, yes_no, [r])
    priors.seed(key, [[math.log(0.2), math.log(0.8)]])
    for k, p_yes in inputs.items():
        lps = [math.log(p_yes), -30, math.log(1 - p_yes), -30]
        answers[k] = read_answer(yes_no, st, [r], [lps], priors=priors, input_key=k)
    assert all(a.prior_inputs == 0 for a in answers.values())
    assert answers["a"].probability_true > 0.5 > answers["b"].probability_true
    # P(yes) 0.3 against a prior of 0.2: odds (0.3/0.2) / (0.7/0.8)
    odds = (0.3 / 0.2) / (0.7 / 0.8)
    assert answers["a"].probability_true == pytest.approx(odds / (1 + odds))


def test_eval_metrics_by_hand():
    assert auc([0.9, 0.8, 0.3, 0.8], [True, True, False, False]) == pytest.approx(0.875)
    assert auc([0.5], [True]) is None
    # two bins: conf .95 (1 right of 2) and .65 (1 right of 1): (2/3)*.45 + (1/3)*.35
    ece = expected_calibration_error([0.95, 0.95, 0.65], [True, False, True])
    assert ece == pytest.approx(2 / 3 * 0.45 + 1 / 3 * 0.35)
    assert negation_of(Question("predicate", "It rains.", statement=True)).instructions == (
        "It is not true that: It rains."
    )


def test_a_noul_with_both_outcomes_described_is_read_as_their_choice_under_cloze():
    q = Question("predicate", "Angry?", (Option("yes", "hostile words"), Option("no", "calm")))
    (r,) = readings(q, Strategy("cloze"))
    assert r.labels == ("hostile words", "calm") and r.owner == (0, 1)
    assert readings(q, Strategy("codes"))[0].labels == ("yes", "Yes", "no", "No")
    one_side = Question("predicate", "Angry?", (Option("yes", "hostile words"), Option("no")))
    assert readings(one_side, Strategy("cloze"))[0].labels[0] == "yes"


def test_contrast_reads_the_opposite_with_yes_counting_for_false():
    from allinone.decisions import Opposites

    q = Question("predicate", "Is this review negative?")
    opp = Question("predicate", "Is this review positive?")
    st = Strategy.parse("codes+contrast")
    one, two = readings(q, st, opp)
    assert "positive" in two.block and two.owner == (1, 1, 0, 0) and two.view == 2
    # a "yes" that follows the text's positivity: P(yes|neg?) = .4, P(yes|pos?) = .8
    v1 = [math.log(0.4), -40, math.log(0.6), -40]
    v2 = [math.log(0.8), -40, math.log(0.2), -40]
    a = read_answer(q, st, [one, two], [v1, v2])
    # log-odds of true: ((ln .4 - ln .6) + (ln .2 - ln .8)) / 2, times the fitted temperature
    z = (math.log(0.4 / 0.6) + math.log(0.2 / 0.8)) / 2 * CONTRAST_TEMPERATURE
    assert a.probability_true == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-9)
    # the temperature sharpens, never turns the answer round
    assert a.probability_true < 0.5 and z < 0
    assert a.strategy == "codes+contrast"
    # without an opposite the answer says the contrast was not read
    (only,) = readings(q, st, None)
    assert read_answer(q, st, [only], [v1]).strategy == "codes"
    ops = Opposites(max_questions=10)
    assert ops.put("Is it good?", " Is it bad?\nmore") == "Is it bad?"
    # the first opposite stays (concurrent writers must all read the same plan)
    assert ops.put("Is it good?", "Is it poor?") == "Is it bad?" == ops.get("Is it good?")
    assert ops.put("Does it mention X?", "does it mention x") is None  # a repeat is no opposite
    assert ops.known("Does it mention X?") and ops.get("Does it mention X?") is None
    assert ops.put("The writer is satisfied.", "Is the writer satisfied?") is None  # reordered
    assert ops.put("Is it red?", "It is blue.") is None  # another form
    assert ops.put("这条评论是负面的吗？", "这条评论是正面的吗？") == "这条评论是正面的吗？"
    small = Opposites(max_questions=2)
    for q in ("a?", "b?", "c?"):
        small.put(q, "z?")
    assert not small.known("a?") and small.known("c?")  # least recently used dropped
