"""The OpenAI routes (and the page's routes, where they share a cause) as the open internet uses
them: each case an attack that once got through, on the app as main() launches it (CPU).

docs/RELIABILITY.md tabulates them: what was sent, what happened before, what holds now.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fake_engine import FakeEngine
from tests.serving import serve
from tests.test_openai_api import error_of

openai = pytest.importorskip("openai")

WAIT_S = 15
CHAT = "v1/chat/completions"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- the body: its size, its type, its nesting --------------------------------------------------


def raw_post(url: str, path: str, head: dict[str, str], body: bytes = b"") -> tuple[int, float]:
    """Send headers (and maybe part of a body) on a socket; the status line and how long it took."""
    parts = urlsplit(url)
    started = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port), timeout=WAIT_S) as sock:
        lines = [f"POST /{path} HTTP/1.1", f"Host: {parts.netloc}"]
        lines += [f"{name}: {value}" for name, value in head.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        status = sock.recv(4096).split(b" ", 2)[1]
    return int(status), time.perf_counter() - started


@pytest.mark.parametrize("path", [CHAT, "gradio_api/queue/join", "gradio_api/call/generate"])
def test_a_body_announced_past_the_limit_is_refused_before_a_byte_of_it_is_read(path):
    with serve(FakeEngine()) as (url, _):
        head = {"Content-Type": "application/json", "Content-Length": str(300 * 2**20)}
        status, seconds = raw_post(url, path, head, b'{"messages": [')  # and nothing more
    assert status == 413 and seconds < 1.0


def test_a_chunked_body_is_cut_off_at_the_limit_while_it_is_read():
    """A body with no length sent a megabyte at a time: the 413 comes once 16 MB have come in,
    not after all 64 (it was read whole, and RSS grew by 305-432 MiB and stayed there)."""
    with serve(FakeEngine()) as (url, _):
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=WAIT_S) as sock:
            head = [f"POST /{CHAT} HTTP/1.1", f"Host: {parts.netloc}"]
            head += ["Content-Type: application/json", "Transfer-Encoding: chunked"]
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            block, sent = b" " * 2**20, 0
            while sent < 64 * 2**20 and not select.select([sock], [], [], 0)[0]:
                try:
                    sock.sendall(b"%x\r\n" % len(block) + block + b"\r\n")
                except OSError:  # the server answered and closed
                    break
                sent += len(block)
            answer = sock.recv(4096)
    assert answer.split(b" ", 2)[1] == b"413" and b"limit is 16 MB" in answer
    assert sent < 24 * 2**20  # the answer came soon after the limit, not after the whole body


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", json.dumps({"prompt": "x"})),
        ("application/x-www-form-urlencoded", "prompt=x"),
        (None, json.dumps({"prompt": "x"})),
    ],
    ids=["text/plain", "form", "no content type"],
)
def test_a_body_that_is_not_declared_json_is_refused_so_no_web_page_can_send_one(
    content_type, body
):
    engine = FakeEngine()
    headers = {"content-type": content_type} if content_type else {}
    with serve(engine) as (url, _):
        response = httpx.post(f"{url}v1/completions", content=body.encode(), headers=headers)
    assert response.status_code == 415 and "Content-Type: application/json" in response.text
    assert error_of(response)["code"] == "unsupported_media_type" and engine.calls == []


def test_a_browser_request_from_another_origin_is_refused_and_the_same_origin_served():
    engine = FakeEngine(["ok"])
    with serve(engine) as (url, _):
        here = url.rstrip("/")
        body = {"prompt": "x", "max_tokens": 1}
        other = httpx.post(
            f"{url}v1/completions", json=body, headers={"origin": "https://evil.example"}
        )
        null = httpx.post(f"{url}v1/completions", json=body, headers={"origin": "null"})
        same = httpx.post(f"{url}v1/completions", json=body, headers={"origin": here})
    assert other.status_code == null.status_code == 403
    assert "another site" in error_of(other)["message"]
    assert same.status_code == 200 and len(engine.calls) == 1


@pytest.mark.parametrize(
    "path", [CHAT, "gradio_api/queue/join", "gradio_api/run/predict", "gradio_api/call/generate"]
)
def test_deeply_nested_json_gets_a_400_and_leaves_no_traceback_in_the_log(path, caplog):
    with serve(FakeEngine()) as (url, _), caplog.at_level(logging.INFO):
        body = '{"data": ' + nested(5000) + ', "messages": ' + nested(5000) + "}"
        response = httpx.post(
            url + path, content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400 and "nests" in response.text
    if path == CHAT:
        assert error_of(response)["type"] == "invalid_request_error"
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text


def test_a_field_of_the_wrong_type_nested_deep_is_named_not_dumped():
    with serve(FakeEngine()) as (url, _):
        body = '{"messages": [{"role": "user", "content": "Hi"}], "stream": ' + nested(900) + "}"
        response = httpx.post(
            f"{url}{CHAT}", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400 and error_of(response)["param"] == "stream"
    assert "a list of 1 item" in error_of(response)["message"]
