"""The `allinone` command as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "ALLINONE_THREADS": "2", "ALLINONE_CTX_PER_SEQ": "1024"}


def run(*args, stdin=None, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "allinone", *args],
        input=stdin,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_classify_prints_the_label():
    r = run("classify", "这家酒店太差了")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "负面"


def test_classify_json_shape_and_stdin():
    r = run("classify", "--json", "-", stdin="这家酒店太差了\n服务周到，环境很好\n")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["label"] for row in rows] == ["负面", "正面"]
    for row in rows:
        assert set(row) == {"task", "label", "scores", "latency_ms"}
        assert row["task"] == "sentiment" and set(row["scores"]) == {"正面", "负面"}


def test_classify_english_task():
    r = run("classify", "--task", "sentiment-en", "An absolute delight from start to finish.")
    assert r.stdout.strip() == "positive", r.stderr


def test_decide_answers_a_task_and_ad_hoc_questions(tmp_path):
    r = run("decide", "--task", "ticket-triage", "I was charged twice. Fix it today!")
    assert r.returncode == 0, r.stderr
    names = [line.split(":")[0] for line in r.stdout.splitlines()]
    assert names == ["urgency", "department", "emotion", "abusive"]
    qfile = tmp_path / "q.toml"
    qfile.write_text(
        '[[questions]]\nname = "lang"\ntype = "choice"\ninstructions = "Which language?"\n'
        'choices = ["中文", "English"]\n',
        encoding="utf-8",
    )
    r = run(
        "decide",
        "--json",
        "--questions",
        str(qfile),
        "--predicate",
        "It is a question.",
        "-",
        stdin="这家酒店太差了",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out["answers"]) == ["lang", "predicate1"]
    assert [p["value"] for p in out["answers"]["lang"]["probabilities"]] == ["中文", "English"]
    assert isinstance(out["usage"]["input_tokens"], int)
    r = run("decide", "x")
    assert r.returncode != 0 and "no questions" in r.stderr


def test_chat_multi_turn_then_ctrl_d_exits_cleanly():
    r = run("chat", stdin="我的名字叫小明。\n我叫什么名字？\n")
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.split("> ") if line.strip()]
    assert len(replies) == 2
    assert all(0 < len(x.strip()) <= 60 for x in replies)
    assert "小明" in replies[1]


def test_chat_ctrl_c_exits_cleanly():
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "allinone", "chat"],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait for the banner (the model is loaded): a loaded machine can take longer than any
    # fixed sleep, and Ctrl-C during the load is a different case (exit 130).
    banner = proc.stderr.readline()
    while banner and "Ctrl-C to quit" not in banner:
        banner = proc.stderr.readline()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, banner + err
    assert "Traceback" not in err


def test_unknown_task_and_model_are_clear_errors():
    r = run("classify", "--task", "nope", "hi")
    assert r.returncode == 2 and "unknown task 'nope'" in r.stderr
    r = run("classify", "--model", "/nonexistent.gguf", "hi")
    assert r.returncode == 2 and "neither a catalog name" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", [["tasks"], ["models"], ["models", "--json"]])
def test_listing_commands(cmd):
    r = run(*cmd)
    assert r.returncode == 0, r.stderr
    if cmd == ["tasks"]:
        assert "sentiment" in r.stdout and "chat" in r.stdout
    elif "--json" in cmd:
        rows = json.loads(r.stdout)
        default = [row for row in rows if row["default"]]
        assert len(default) == 1 and default[0]["present"] is True
    else:
        assert "qwen2.5-coder-0.5b-instruct-q4_k_m" in r.stdout
