"""Tool calls: parsing replies in the Hermes format, whole and streamed, and the required-call
grammar's schema (pure functions; the engine's side is in tests/integration/test_openai_surface)."""

from __future__ import annotations

import json

from allinone.api.protocol import ToolDefinition
from allinone.api.tool_calls import (
    ToolCallStream,
    parse_tool_calls,
    required_call_grammar,
)

NAMES = {"get_weather", "add"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_a_reply_of_one_call_has_no_content():
    content, calls = parse_tool_calls(CALL, NAMES)
    assert content is None
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("call_")


def test_two_calls_and_text_around_them():
    add = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    content, calls = parse_tool_calls(f"Let me check.\n{CALL}\n{add}", NAMES)
    assert content == "Let me check."
    assert [c.function.name for c in calls] == ["get_weather", "add"]
    assert len({c.id for c in calls}) == 2


def test_a_block_that_is_not_a_call_leaves_its_text_without_the_tags():
    for inner in (
        '{"name": "launch", "arguments": {}}',
        "{not json}",
        '{"name": "add", "arguments": [1, 2]}',
        '{"name": "add", "arguments": {"x": NaN}}',
        '{"name": ["add"], "arguments": {}}',
        '{"name": {"add": 1}, "arguments": {}}',
    ):
        text = f"<tool_call>\n{inner}\n</tool_call>"
        content, calls = parse_tool_calls(text, NAMES)
        assert calls == [] and content == inner


def test_arguments_written_as_a_json_string_are_accepted():
    text = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    _, calls = parse_tool_calls(text, NAMES)
    assert json.loads(calls[0].function.arguments) == {"a": 1}


def test_a_last_call_without_its_close_tag_still_counts():
    _, calls = parse_tool_calls(CALL.removesuffix("</tool_call>"), NAMES)
    assert len(calls) == 1


def test_streamed_pieces_give_the_same_calls_and_hold_back_a_partial_tag():
    text = f"Sure. {CALL}\n{CALL}"
    for size in (1, 3, 7, 50):
        stream = ToolCallStream(NAMES)
        events = []
        for i in range(0, len(text), size):
            got = stream.feed(text[i : i + size])
            # no piece of the tag ever leaks out as content
            assert all("<" not in v for k, v in got if k == "content")
            events += got
        events += stream.finish()
        assert "".join(v for k, v in events if k == "content") == "Sure."
        assert [v.function.name for k, v in events if k == "call"] == ["get_weather"] * 2


def test_plain_text_streams_through_unchanged():
    stream = ToolCallStream(NAMES)
    text = "No tools needed: 2 < 3 and <b> is bold.\n"
    events = [e for ch in text for e in stream.feed(ch)] + stream.finish()
    assert "".join(v for _, v in events) == text


def _tools() -> list[ToolDefinition]:
    return [
        ToolDefinition.model_validate(
            {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        )
        for n in ("get_weather", "add")
    ]


def test_the_required_call_grammar_is_one_call_of_one_function_or_any_of_them():
    both = required_call_grammar(_tools())
    assert "start: call\n" in both and "call: call_0 | call_1" in both
    assert '"name\\": \\"add\\"' in both and '"<tool_call>"' in both
    one = required_call_grammar(_tools(), "add", tag_ids=(7, 8))
    assert "call: call_0\n" in one and "get_weather" not in one
    assert one.count("<[7]>") == 1 and one.count("<[8]>") == 1


def test_a_reply_that_is_only_a_call_object_counts_without_tags():
    text = ' {"name": "get_weather", "arguments": {"city": "Paris"}}'
    content, calls = parse_tool_calls(text, NAMES)
    assert content is None and calls[0].function.name == "get_weather"
    stream = ToolCallStream(NAMES)
    events = [e for ch in text for e in stream.feed(ch)] + stream.finish()
    assert [k for k, _ in events] == ["call"]
    # JSON that is not a call stays text, whole
    other = '{"answer": 42}'
    assert parse_tool_calls(other, NAMES) == (other, [])


def test_bare_call_objects_one_per_line_are_parallel_calls():
    one = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    two = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    _, calls = parse_tool_calls(f"{one}\n{two}\n", NAMES)
    assert [c.function.name for c in calls] == ["get_weather", "add"]
    cut = f'{one}\n{{"name": "add", "argu'  # cut by max_tokens: the reply stays text
    assert parse_tool_calls(cut, NAMES) == (cut, [])


def test_a_call_inside_a_markdown_fence_counts_and_other_fenced_code_stays_text():
    # How the 0.5B model answered 4 of 16 clear requests in bench_structured's labelled set.
    fenced = '```json\n{\n  "name": "add",\n  "arguments": {\n    "a": 1,\n    "b": 2\n  }\n}\n```'
    content, calls = parse_tool_calls(fenced, NAMES)
    assert content is None and [c.function.name for c in calls] == ["add"]
    assert json.loads(calls[0].function.arguments) == {"a": 1, "b": 2}
    stream = ToolCallStream(NAMES)
    events = [e for ch in fenced for e in stream.feed(ch)] + stream.finish()
    assert [k for k, _ in events] == ["call"]
    # JSON in a fence that is not a call, and code, stay text whole
    for other in ('```json\n{"answer": 42}\n```', "```python\nprint(1)\n```"):
        assert parse_tool_calls(other, NAMES) == (other, [])
    # code that is not JSON streams as it comes, not held to the end
    stream = ToolCallStream(NAMES)
    early = stream.feed("```python\nprint(1)\n") + stream.feed("x = 2\n")
    assert "".join(v for k, v in early if k == "content").startswith("```python\nprint(1)")


def _events(text: str, size: int, max_calls: int | None = None) -> list:
    stream = ToolCallStream(NAMES, max_calls)
    events = []
    for i in range(0, len(text), size):
        events += stream.feed(text[i : i + size])
    return events + stream.finish()


PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ROME = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
PRETTY_ROME = '{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Rome"\n  }\n}'


def test_every_form_of_two_calls_gives_two_calls_with_their_own_ids():
    # Issue #30: two calls written as two JSON lines in one block came back as content.
    forms = [
        f"<tool_call>\n{PARIS}\n{ROME}\n</tool_call>",  # one block, one call per line
        f"<tool_call>\n[{PARIS}, {ROME}]\n</tool_call>",  # one block, a JSON array
        f"{PARIS}\n{ROME}",  # bare, one per line
        f"{PARIS}\n{PRETTY_ROME}\n",  # bare, pretty-printed
        f"{PARIS},\n{ROME}",  # bare, comma-separated
        f"[{PARIS},\n {ROME}]",  # bare array
        f"```json\n{PARIS}\n```\n```json\n{ROME}\n```",  # a fence each
        f"```json\n[{PARIS}, {ROME}]\n```",  # an array in a fence
        # OpenAI's own shape, as a model that saw it in the history writes it back
        f'{{"type": "function", "function": {PARIS}}}\n{ROME}',
    ]
    for text in forms:
        content, calls = parse_tool_calls(text, NAMES)
        assert content is None, text
        assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Rome"]
        assert len({c.id for c in calls}) == 2
        for size in (1, 5, 1000):
            events = _events(text, size)
            assert [k for k, _ in events] == ["call", "call"], (text, size)
            assert len({v.id for _, v in events}) == 2


def test_a_call_cut_anywhere_never_puts_markup_or_half_a_call_in_content():
    # Issue #30: a forced call cut by max_tokens came back as content with its markup.
    whole = f"Let me check.\n<tool_call>\n{PARIS}\n</tool_call>"
    call_at = whole.index("<tool_call>")
    json_end = whole.index("}}") + 2
    for cut in range(len(whole) + 1):
        text = whole[:cut]
        content, calls = parse_tool_calls(text, NAMES)
        streamed = _events(text, 3)
        for got in (content or "", "".join(v for k, v in streamed if k == "content")):
            assert "<tool" not in got and "</" not in got and "{" not in got, (cut, got)
        if cut <= call_at:
            assert calls == [] and content == (text or None if cut else text)
        else:  # inside the call: the text before it, and the call only once it is whole
            assert content == "Let me check."
            assert len(calls) == (1 if cut >= json_end else 0), cut
            assert [k for k, _ in streamed].count("call") == len(calls)


def test_a_forced_call_cut_short_is_content_null_and_no_calls():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "P'
    assert parse_tool_calls(text, NAMES) == (None, [])
    assert _events(text, 1) == []


def test_a_stray_close_tag_is_not_content():
    content, calls = parse_tool_calls(f"<tool_call>\n{PARIS}\n</tool_call></tool_call>", NAMES)
    assert content is None and len(calls) == 1
    assert parse_tool_calls("Done.</tool_call>", NAMES) == ("Done.", [])


def test_max_calls_keeps_the_first_call_only():
    text = f"<tool_call>\n{PARIS}\n{ROME}\n</tool_call>"
    _, calls = parse_tool_calls(text, NAMES, max_calls=1)
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris"]
    assert [k for k, _ in _events(f"{PARIS}\n{ROME}", 4, max_calls=1)] == ["call"]


def test_arguments_that_decode_to_a_lone_surrogate_are_not_a_call():
    # A model may write the escape; such arguments could not be sent back as JSON text.
    text = '{"name": "get_weather", "arguments": {"city": "\\ud800"}}'
    content, calls = parse_tool_calls(text, NAMES)
    assert calls == [] and content == text
    content.encode("utf-8")


def test_nesting_past_the_json_decoders_limit_is_no_call_and_no_crash():
    # A reply (which logit_bias can force) or a history call nested ~1,000 deep makes Python's
    # JSON decoder raise RecursionError, not ValueError.
    deep = '{"name": "add", "arguments": ' + '{"a": ' * 1100 + "1" + "}" * 1100 + "}"
    for text in (deep, "[" * 1100 + "]" * 1100, f"<tool_call>\n{deep}\n</tool_call>"):
        content, calls = parse_tool_calls(text, NAMES)
        assert calls == [] and "<tool_call>" not in (content or "")


def test_arguments_named_parameters_are_the_arguments():
    # Llama-style replies (and some of Qwen's) write "parameters": they are not dropped
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    _, calls = parse_tool_calls(text, NAMES)
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
