"""Every bad input gets a 4xx with one JSON envelope, and the server keeps serving."""

import httpx
import pytest

BAD = [
    # (method, path, kwargs, status, param)
    ("post", "/v1/classify", {"json": {"task": "sentiment", "input": ""}}, 400, "input"),
    ("post", "/v1/classify", {"json": {"task": "sentiment", "input": "   "}}, 400, "input"),
    ("post", "/v1/classify", {"json": {"task": "sentiment", "input": []}}, 400, "input"),
    ("post", "/v1/classify", {"json": {"task": "sentiment", "input": 42}}, 400, None),
    ("post", "/v1/classify", {"json": {"task": "sentiment"}}, 400, "input"),
    ("post", "/v1/classify", {"json": {"task": "nope", "input": "hi"}}, 404, "task"),
    ("post", "/v1/classify", {"json": {"task": "chat", "input": "hi"}}, 400, None),
    ("post", "/v1/classify", {"json": {"task": "sentiment", "input": ["x"] * 300}}, 400, "input"),
    (
        "post",
        "/v1/classify",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        None,
    ),
    (
        "post",
        "/v1/classify",
        {"content": b"\xff\xfe\x00garbage", "headers": {"content-type": "application/json"}},
        400,
        None,
    ),
    ("post", "/v1/classify", {"json": {"task": "sentiment", "input": "x" * 2_000_000}}, 413, None),
    ("post", "/v1/chat/completions", {"json": {"model": "chat", "messages": []}}, 400, "messages"),
    (
        "post",
        "/v1/chat/completions",
        {"json": {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}},
        404,
        "model",
    ),
    (
        "post",
        "/v1/chat/completions",
        {"json": {"model": "chat", "messages": [{"role": "user", "content": "x" * 3000}]}},
        400,
        "messages",
    ),
    (
        "post",
        "/v1/chat/completions",
        {"json": {"model": "chat", "messages": [{"role": "wizard", "content": "hi"}]}},
        400,
        None,
    ),
    (
        "post",
        "/v1/chat/completions",
        {
            "json": {
                "model": "chat",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": -1,
            }
        },
        400,
        "max_tokens",
    ),
    (
        "post",
        "/v1/chat/completions",
        {
            "json": {
                "model": "chat",
                "messages": [{"role": "user", "content": "hi"}],
                "temperature": "hot",
            }
        },
        400,
        "temperature",
    ),
    (
        "post",
        "/v1/chat/completions",
        {"json": {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "n": 99}},
        400,
        "n",
    ),
    (
        "post",
        "/v1/chat/completions",
        {"json": {"model": "chat", "messages": [{"role": "assistant", "content": "hi"}]}},
        400,
        "messages",
    ),
    (
        "post",
        "/v1/chat/completions",
        {
            "json": {
                "model": "chat",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ],
            }
        },
        400,
        "messages.0.content",
    ),
    # JSON escapes that decode to a lone surrogate: not text; 400 naming the field, every route
    *[
        ("post", path, {"content": body, "headers": {"content-type": "application/json"}}, 400, p)
        for path, body, p in [
            ("/v1/classify", rb'{"task": "sentiment", "input": "\ud800"}', "input"),
            ("/v1/classify", rb'{"task": "sentiment", "input": ["ok", "a\udfff"]}', "input.1"),
            ("/v1/extract", rb'{"task": "summarize", "input": "x\ud800y"}', "input"),
            (
                "/v1/chat/completions",
                rb'{"model": "chat", "messages": [{"role": "user", "content": "\ud800"}]}',
                "messages.0.content",
            ),
            (
                "/v1/chat/completions",
                rb'{"model": "chat", "messages": [{"role": "user", "content": '
                rb'[{"type": "text", "text": "\udc00"}]}]}',
                "messages.0.content.0.text",
            ),
            (
                "/v1/chat/completions",
                rb'{"model": "chat", "stop": ["\ud800"], '
                rb'"messages": [{"role": "user", "content": "hi"}]}',
                "stop.0",
            ),
        ]
    ],
    ("get", "/v1/nothing-here", {}, 404, None),
    ("delete", "/v1/classify", {}, 405, None),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "param"),
    BAD,
    ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)],
)
def test_bad_input_gets_one_envelope_and_server_keeps_serving(
    server, method, path, kwargs, status, param
):
    r = httpx.request(method, f"{server.url}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and isinstance(err["message"], str)
    if b"\\ud" in kwargs.get("content", b"") or b"\\udc" in kwargs.get("content", b""):
        assert "surrogate" in err["message"], err
    if param is not None:
        assert err["param"] == param
    ok = httpx.post(
        f"{server.url}/v1/classify", json={"task": "sentiment", "input": "很好"}, timeout=60
    )
    assert ok.status_code == 200


def test_chunked_body_over_the_cap_is_refused(server):
    def gen():
        for _ in range(40):
            yield b"x" * 50_000

    r = httpx.post(
        f"{server.url}/v1/classify",
        content=gen(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
