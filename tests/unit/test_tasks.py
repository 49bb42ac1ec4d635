"""Task files: built-ins load, bad files fail with a message naming the problem, limits apply."""

from pathlib import Path

import pytest

from allinone.serving.errors import InputError
from allinone.tasks import TaskRegistry, load_task_file


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_builtin_tasks_cover_both_jobs():
    reg = TaskRegistry.load()
    assert reg.get("sentiment").labels == ["正面", "负面"]
    assert reg.get("sentiment-en").labels == ["positive", "negative"]
    chat = reg.get("chat")
    assert chat.kind == "chat" and chat.output.max_chars == 60
    assert reg.get("sentiment").label_for_value("1") == "正面"


def test_user_task_dir_adds_and_overrides(tmp_path):
    write(tmp_path, "spam", 'kind = "classify"\nsystem = "Spam?"\nlabels = ["spam", "ham"]\n')
    write(tmp_path, "chat", 'kind = "chat"\nsystem = "Be terse."\n[output]\nmax_chars = 10\n')
    reg = TaskRegistry.load([tmp_path])
    assert reg.get("spam").labels == ["spam", "ham"]
    assert reg.get("chat").output.max_chars == 10


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('kind = "classify"\nsystem = "x"\nlabels = ["a"]\n', "at least two labels"),
        ('kind = "classify"\nsystem = "x"\nlabels = ["a", "a"]\n', "distinct"),
        ('kind = "chat"\nsystem = "x"\nlabels = ["a", "b"]\n', "has no labels"),
        (
            'kind = "classify"\nsystem = "x"\nlabels = ["a", "b"]\n'
            '[[examples]]\ninput = "q"\noutput = "c"\n',
            "example outputs must be labels",
        ),
        ('kind = "poem"\nsystem = "x"\n', "kind"),
        ('kind = "chat"\n', "system"),
        ('kind = "chat"\nsystem = "x"\ncolour = "red"\n', "colour"),
        ('kind = = "chat"', "cannot read task file"),
    ],
)
def test_invalid_task_files_say_what_is_wrong(tmp_path, body, needle):
    path = write(tmp_path, "bad", body)
    with pytest.raises(InputError) as err:
        load_task_file(path)
    assert needle in str(err.value)
    assert "bad.toml" in str(err.value)


def test_input_limit_truncates_or_rejects():
    reg = TaskRegistry.load()
    senti = reg.get("sentiment")
    assert len(senti.prepare_input("好" * 5000)) == senti.input.max_chars
    chat = reg.get("chat")
    with pytest.raises(InputError, match="at most 2000"):
        chat.prepare_input("x" * 2001)
    with pytest.raises(InputError, match="empty"):
        senti.prepare_input("   ")


def test_unknown_task_lists_known_names():
    with pytest.raises(InputError) as err:
        TaskRegistry.load().get("nope")
    assert "sentiment" in str(err.value) and err.value.not_found
