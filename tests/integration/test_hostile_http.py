"""Hostile HTTP against a real tiny-model server on loopback: names a client makes up leave no
trace in /metrics; oversized or slow headers and stalled bodies are answered (431/414/408) and the
connection closed; the key check comes before any body; the page carries its security headers.
After each case the server keeps serving."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import time
import uuid

import httpx
import pytest

# -- raw HTTP/1.1 on a socket (httpx cannot send what these tests send) ------------------------


def _connect(srv) -> socket.socket:
    # The timeout only stops a broken test from hanging: every case expects an answer or a
    # close from the server long before it.
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of the next response on ``sock``.
    RemoteDisconnected when the server closed without one; TimeoutError when it did neither."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def _send(sock: socket.socket, data: bytes) -> None:
    """Send ``data``; the server may refuse halfway and stop reading, which is not an error."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _exchange(srv, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with _connect(srv) as sock:
        _send(sock, data)
        return _read_response(sock)


def _closed(sock: socket.socket) -> bool:
    """True once the server closed the connection (reads end-of-file or a reset)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def _assert_serves(srv) -> None:
    r = httpx.get(f"{srv.url}/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def _error(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# -- 2: labels come only from names the server knows ------------------------------------------


def _series(metrics: str) -> set[str]:
    """Every time series of a /metrics text: name and labels, without the value."""
    return {line.rsplit(" ", 1)[0] for line in metrics.splitlines() if line and line[0] != "#"}


def test_unknown_names_leave_no_trace_in_metrics(tiny_server):
    srv = tiny_server()
    marker = f"zq{uuid.uuid4().hex[:10]}"
    names = [f"{marker}-task-{i}" for i in range(176)]
    names += [f"{marker}-long-{i}-" + "n" * 60_000 for i in range(4)]

    def flood(client: httpx.Client, batch: list[str]) -> None:
        for name in batch:
            for path, body in (
                ("/v1/classify", {"task": name, "input": "hello"}),
                ("/v1/extract", {"task": name, "input": "hello"}),
                ("/v1/decide", {"task": name, "input": "hello"}),
                (
                    "/v1/chat/completions",
                    {"model": name, "messages": [{"role": "user", "content": "hi"}]},
                ),
            ):
                r = client.post(path, json=body)
                assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
            # unmatched paths (a 60,000-character one is over the request-target limit: 414)
            for method in ("GET", "POST"):
                r = client.request(method, f"/{name}", content=b"{}")
                assert r.status_code in (404, 414), (method, r.status_code)

    with httpx.Client(base_url=srv.url, timeout=60) as client:
        # One unknown name of each kind first, so every series the flood may touch exists.
        flood(client, [f"{marker}-warm", f"{marker}-warm-long-" + "n" * 60_000])
        client.get("/metrics")  # a scrape is a request too: its series exist from now on
        before = client.get("/metrics").text
        flood(client, names)
        after = client.get("/metrics").text

    assert marker not in after
    # No new series at all: the flood only moved counters.
    assert _series(after) == _series(before), sorted(_series(after) - _series(before))[:5]
    assert len(after) < len(before) + 4096  # only longer numbers
    _assert_serves(srv)


# -- 6: header size and count, header and body time ---------------------------------------------

_GET = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"

OVERSIZED = {
    "one 1 MiB header": (_GET + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n", 431),
    "8 MiB of headers": (
        _GET + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 8000) for i in range(1024)) + b"\r\n",
        431,
    ),
    "20,000 headers": (_GET + b"".join(b"X-%d: v\r\n" % i for i in range(20_000)) + b"\r\n", 431),
    "a 1 MiB URL": (b"GET /health?q=" + b"u" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
}


def test_oversized_headers_are_refused_and_the_server_keeps_serving(tiny_server):
    srv = tiny_server()
    for case, (request_bytes, status) in OVERSIZED.items():
        got, headers, body = _exchange(srv, request_bytes)
        assert got == status, (case, body[:200])
        assert headers["connection"] == "close", case
        assert _error(body)["code"] in ("request_header_fields_too_large", "uri_too_long")
        _assert_serves(srv)


def test_slow_headers_and_stalled_bodies_are_cut_off(tiny_server):
    srv = tiny_server(ALLINONE_HEADER_TIMEOUT_S="1", ALLINONE_BODY_TIMEOUT_S="1")

    # Half the headers, then nothing: 408 and the connection closed.
    with _connect(srv) as sock:
        _send(sock, _GET + b"X-Half: ")
        status, _, body = _read_response(sock)
        assert status == 408 and _error(body)["code"] == "request_timeout"
        assert _closed(sock)

    # Headers trickled a byte at a time (never finished): cut off at the same limit, not reset
    # by each byte.
    with _connect(srv) as sock:
        for byte in _GET + b"X-Slow: " + b"s" * 200:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered
            _send(sock, bytes([byte]))
            time.sleep(0.05)
        status, _, body = _read_response(sock)
        assert status == 408

    # A connection that sends nothing is closed.
    with _connect(srv) as sock:
        assert _closed(sock)

    # A chunked body that stops after its first chunk: 408, closed.
    with _connect(srv) as sock:
        _send(
            sock,
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"tas\r\n',
        )
        status, _, body = _read_response(sock)
        assert status == 408 and _error(body)["code"] == "request_timeout"
        assert _closed(sock)

    # A body shorter than its Content-Length, the same.
    with _connect(srv) as sock:
        _send(sock, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        status, _, _ = _read_response(sock)
        assert status == 408
    _assert_serves(srv)
    r = httpx.post(
        f"{srv.url}/v1/classify", json={"task": "sentiment-en", "input": "hi"}, timeout=60
    )
    assert r.status_code == 200


# -- 9: the key check comes first; CORS private network ----------------------------------------

ORIGIN = "https://app.example.com"


@pytest.fixture
def keyed(tiny_server):
    return tiny_server(ALLINONE_API_KEYS='["k1"]', ALLINONE_CORS_ORIGINS=json.dumps([ORIGIN]))


def test_a_private_network_preflight_from_an_allowed_origin_passes(keyed):
    ask = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
        "Access-Control-Request-Private-Network": "true",
    }
    r = httpx.options(f"{keyed.url}/v1/chat/completions", headers=ask)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-private-network"] == "true"
    assert r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(f"{keyed.url}/v1/chat/completions", headers={**ask, "Origin": "https://evil"})
    assert "access-control-allow-origin" not in r.headers


def test_every_api_route_checks_the_key_before_reading_the_body(keyed):
    spec = httpx.get(f"{keyed.url}/openapi.json").json()
    posts = [p for p, ops in spec["paths"].items() if p.startswith("/v1/") and "post" in ops]
    assert {"/v1/classify", "/v1/systemone", "/v1/audio/transcriptions"} <= set(posts)
    for path in posts:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}):
            r = httpx.post(
                keyed.url + path,
                content=b"this is not JSON",
                headers={"Content-Type": "application/json", **headers},
            )
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            body = r.json()
            if path == "/v1/systemone":  # TypeSafe's envelope
                assert body["detail"]["error_type"] == "authentication_error", body
            else:
                assert body["error"]["type"] == "authentication_error", body
    r = httpx.get(f"{keyed.url}/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_a_declared_upload_without_a_key_is_refused_before_its_bytes(keyed):
    # 20 MB is under the audio upload cap (25 MB): without the key coming first the server
    # would wait for all of it. Not a byte of the body is sent.
    for path in ("/v1/audio/transcriptions", "/v1/classify"):
        with _connect(keyed) as sock:
            _send(
                sock,
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                "boundary=b\r\nContent-Length: 20000000\r\n\r\n".encode(),
            )
            status, headers, body = _read_response(sock)
            # and the connection ends: a client that goes on sending is not read for ever
            sock.settimeout(10)
            _send(sock, b"x" * 65536)
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert headers["connection"] == "close" and closed
        assert _error(body)["type"] == "authentication_error"
    # the public routes stay public; with the key, the API answers
    for path in ("/health", "/ready", "/metrics", "/", "/ui/config"):
        assert httpx.get(keyed.url + path).status_code == 200, path
    r = httpx.post(
        f"{keyed.url}/v1/classify",
        json={"task": "sentiment-en", "input": "great"},
        headers={"Authorization": "Bearer k1"},
        timeout=60,
    )
    assert r.status_code == 200


# -- 10: security headers ----------------------------------------------------------------------


def test_the_page_and_every_answer_carry_security_headers(tiny_server):
    srv = tiny_server()
    for path in ("/", "/ui"):
        r = httpx.get(srv.url + path)
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-content-type-options"] == "nosniff"
    r = httpx.get(f"{srv.url}/ui/assets/app.js")
    assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    answers = [
        httpx.get(f"{srv.url}/health"),
        httpx.get(f"{srv.url}/metrics"),
        httpx.get(f"{srv.url}/no-such-route"),
        httpx.post(f"{srv.url}/v1/classify", content=b"{bad", headers={"Content-Type": "x"}),
    ]
    for r in answers:
        assert r.headers["x-content-type-options"] == "nosniff", r.url
    _, headers, _ = _exchange(srv, OVERSIZED["20,000 headers"][0])
    assert headers["x-content-type-options"] == "nosniff"
