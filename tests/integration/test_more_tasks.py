"""More tasks on the same model, from task files alone: triage, safety screening, summaries."""

import json
from pathlib import Path

import pytest

from allinone.evaluation import evaluate, read_labelled

DATA = Path(__file__).resolve().parents[1] / "data"


def test_triage_on_its_labelled_sample(service):
    task = service.tasks.get("triage")
    rows = read_labelled(DATA / "triage.tsv", task)
    assert len(rows) >= 20
    report = evaluate(service, "triage", rows, progress=False)
    # Measured 0.708 (17/24) with the default model (it leans to 紧急); the floor allows one
    # text to move. See docs/benchmarks.md.
    assert report.raw.accuracy >= 16 / 24, report.raw.confusion


def test_safety_screen_flags_harmful_and_passes_safe(service):
    task = service.tasks.get("safety")
    rows = read_labelled(DATA / "safety.tsv", task)
    assert len(rows) >= 20
    results = service.classify("safety", [r.text for r in rows])
    flagged_right = sum(
        (res.label != task.flag_unless) == (row.label != task.flag_unless)
        for res, row in zip(results, rows, strict=True)
    )
    # safe vs flagged is the decision that matters; measured 19/24 with the default model.
    assert flagged_right >= 18, [(r.text[:20], x.label) for r, x in zip(rows, results, strict=True)]
    for res in results:
        assert res.flagged == (res.label != "safe")
        if res.flagged:
            assert res.category in service.tasks.get("safety-category").labels
        else:
            assert res.category is None


def test_summaries_always_parse_and_respect_their_caps(service):
    task = service.tasks.get("summarize")
    emotion = next(f for f in task.fields if f.name == "emotion")
    summary = next(f for f in task.fields if f.name == "summary")
    rows = _transcripts()
    assert len(rows) >= 20
    correct = 0
    for gold, text in rows:
        result = service.extract("summarize", text)
        parsed = json.loads(json.dumps(result.output, ensure_ascii=False))
        assert set(parsed) == {"summary", "emotion"}
        assert parsed["emotion"] in emotion.labels
        assert 0 < len(parsed["summary"]) <= summary.max_chars
        correct += parsed["emotion"] == gold
    # The emotion is a 5-way label from a 0.5B model; measured 8/20 (chance is 4/20).
    assert correct >= 7


def _transcripts() -> list[tuple[str, str]]:
    """(gold emotion, transcript) pairs."""
    out = []
    for line in (DATA / "summarize.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        gold, _, text = line.partition("\t")
        out.append((gold, text))
    return out


def test_extract_is_refused_for_other_task_kinds(service):
    from allinone.serving.errors import InputError

    with pytest.raises(InputError, match="not an extract task"):
        service.extract("sentiment", "hi")


# Anger, joy, sadness and surprise: the emotions the default model tells apart; it confuses fear
# and neutral with the others (per-label figures in docs/decision-accuracy.md).
EMOTIONS = [
    ("I'm so furious they lost my luggage AGAIN, worst airline ever!", "anger"),
    ("你们客服太离谱了，问了三次都没人管，气死我了！", "anger"),
    ("We won the championship!!! Best day of my life!", "joy"),
    ("My grandmother passed away last night. I miss her so much.", "sadness"),
    ("养了十年的猫走了，我一整天都在哭。", "sadness"),
    ("天哪！他居然中了五百万大奖，完全没想到！", "surprise"),
]
DEPARTMENTS = [
    ("Someone stole my wallet with my card in it, please block it.", "security"),
    ("How much do you charge to exchange pounds into euros?", "fees_exchange"),
    ("I tried to top up with Apple Pay and it didn't go through.", "top_up"),
    ("How do I send money to my sister's bank account abroad?", "transfers"),
    ("I need to change the home address on my profile.", "account"),
    ("My new card still hasn't arrived in the post.", "cards"),
    ("A restaurant charged my card twice for the same meal.", "payments"),
]


def test_built_in_emotion_task_on_clear_examples(service):
    # Clear cases written for this test (not from the evaluation sets), Chinese and English;
    # measured accuracy on labelled sets: docs/decision-accuracy.md. One miss is allowed.
    results = service.classify("emotion", [text for text, _ in EMOTIONS])
    right = [res.label == gold for res, (_, gold) in zip(results, EMOTIONS, strict=True)]
    assert sum(right) >= len(EMOTIONS) - 1, [
        (t[:24], r.label) for (t, _), r in zip(EMOTIONS, results, strict=True)
    ]


def test_built_in_routing_task_on_clear_examples(service):
    # One clear message per department, written for this test. The 0.5B model confuses
    # neighbouring departments (a transfer read as a card matter, a double charge as a fee;
    # routing macro-F1 on BANKING77 in docs/decision-accuracy.md): the right department must be
    # among its three most likely for every message, and first for five of the seven.
    results = service.classify("routing", [text for text, _ in DEPARTMENTS])
    ranks = [
        sorted(res.scores, key=res.scores.get, reverse=True).index(gold)
        for res, (_, gold) in zip(results, DEPARTMENTS, strict=True)
    ]
    assert max(ranks) <= 2 and ranks.count(0) >= 5, list(
        zip([g for _, g in DEPARTMENTS], ranks, strict=True)
    )
