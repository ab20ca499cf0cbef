"""The OpenAI routes (and the page's routes, where they share a cause) as the open internet uses
them: each case an attack that once got through, on the app as main() launches it (CPU).

docs/RELIABILITY.md tabulates them: what was sent, what happened before, what holds now.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fakes.fake_engine import FakeEngine
from tests.fakes.serving import serve
from tests.web.test_openai_api import client_for, error_of, user
from tests.web.test_reliability import until
from web.openai.routes import MODEL_ID

openai = pytest.importorskip("openai")

WAIT_S = 15
CHAT = "v1/chat/completions"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- the body: its size, its type, its nesting --------------------------------------------------


def raw_post(
    url: str, path: str, head: dict[str, str], body: bytes = b""
) -> tuple[int, float, bytes]:
    """Send headers (and maybe part of a body) on a socket; the status, how long it took, and
    what else came back before the server went quiet for a second."""
    parts = urlsplit(url)
    started = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port), timeout=WAIT_S) as sock:
        lines = [f"POST /{path} HTTP/1.1", f"Host: {parts.netloc}"]
        lines += [f"{name}: {value}" for name, value in head.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        answer = sock.recv(4096)
        seconds = time.perf_counter() - started
        sock.settimeout(1.0)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                answer += chunk
    return int(answer.split(b" ", 2)[1]), seconds, answer


@pytest.mark.parametrize("path", [CHAT, "gradio_api/queue/join", "gradio_api/call/generate"])
def test_a_body_announced_past_the_limit_is_refused_before_a_byte_of_it_is_read(path):
    with serve(FakeEngine()) as (url, _):
        head = {"Content-Type": "application/json", "Content-Length": str(300 * 2**20)}
        status, seconds, answer = raw_post(url, path, head, b'{"messages": [')  # and no more
    assert status == 413 and seconds < 1.0
    assert b"314,572,800 bytes or more; the limit is 16 MB" in answer


def test_a_chunked_body_is_cut_off_at_the_limit_while_it_is_read():
    """A body with no length sent a megabyte at a time: the 413 comes once 16 MB have come in,
    not after all 64 (it was read whole, and RSS grew by 305-432 MiB and stayed there)."""
    with serve(FakeEngine()) as (url, _):
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=WAIT_S) as sock:
            head = [f"POST /{CHAT} HTTP/1.1", f"Host: {parts.netloc}"]
            head += ["Content-Type: application/json", "Transfer-Encoding: chunked"]
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            block, sent, answer = b" " * 2**20, 0, b""
            try:
                while sent < 64 * 2**20:
                    if select.select([sock], [], [], 0)[0]:
                        answer = sock.recv(4096)
                        break
                    sock.sendall(b"%x\r\n" % len(block) + block + b"\r\n")
                    sent += len(block)
            except OSError:  # the server stopped reading and closed (a reset can drop its 413)
                pass
    assert sent < 24 * 2**20  # it stopped soon after the limit, not after the whole body
    assert not answer or answer.split(b" ", 2)[1] == b"413"


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


# ---- 1. one request must not freeze the server ---------------------------------------------------


def test_system_messages_each_under_the_limit_are_refused_at_once_by_their_total():
    """80 system messages of 190,000 characters: a 400 naming the total before any tokenizing
    (it took 12.7 s, and /health waited 11.8 s behind the tokenizer)."""
    engine = FakeEngine()
    messages = [{"role": "system", "content": "x" * 190_000}] * 80 + [user("Hi")]
    with serve(engine) as (url, _):
        started = time.perf_counter()
        response = httpx.post(f"{url}{CHAT}", json={"messages": messages}, timeout=WAIT_S)
        seconds = time.perf_counter() - started
    error = error_of(response)
    assert response.status_code == 400 and error["param"] == "messages"
    assert "15,200,160 characters together; the limit is 400,000" in error["message"]
    assert seconds < 2.0 and engine.calls == []


def test_a_long_conversation_keeps_its_newest_turns_within_the_limit_as_the_chat_does():
    engine = FakeEngine(["ok"], tokens_per_char=0.001)  # the characters bind, not the tokens
    old = [user("a" * 300_000), {"role": "assistant", "content": "b" * 10}]
    with serve(engine) as (url, _):
        answer = client_for(url).chat.completions.create(
            model=MODEL_ID, messages=[*old, *old, user("What now?")]
        )
    assert answer.choices[0].message.content == "ok"
    sent = "".join(segment.text for segment in engine.calls[-1].segments)
    assert sent.count("a" * 300_000) == 1 and "What now?" in sent


def test_tokenizing_a_long_prompt_leaves_the_interpreter_to_other_requests(fp16_dir):
    from starcoder2.prompt import Segment
    from starcoder2.tokens import PromptEncoder

    encoder = PromptEncoder(fp16_dir / "tokenizer.json")
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    segment = Segment(text * 25_000, trusted=False)  # 2 MB: seconds of work
    ticks: list[float] = []
    done = threading.Event()

    def tick() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            done.wait(0.005)  # the pace of the other request, not synchronisation

    ticker = threading.Thread(target=tick)
    ticker.start()
    started = time.perf_counter()
    ids = encoder.encode([segment])
    worked = time.perf_counter() - started
    done.set()
    ticker.join()
    longest = max(b - a for a, b in zip(ticks, ticks[1:], strict=False))
    assert len(ids) > 100_000 and worked > 0.5
    assert longest < 0.25, f"the other thread waited {longest:.2f} s of {worked:.2f}"


# ---- 3. a client that hangs up ------------------------------------------------------------------


def test_hanging_up_a_whole_answer_cancels_its_job_within_a_second():
    """`stream: false`, the client gone after half a second: the engine's job ends within one
    (it generated on and held its place for 5 s and more)."""
    engine = FakeEngine(["tok "] * 2000, chunk_delay_s=0.01)
    with serve(engine) as (url, web):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}{CHAT}", json={"messages": [user("Go")]}, timeout=0.5)
        dropped = time.perf_counter()
        (call,) = engine.calls
        assert call.closed_event.wait(WAIT_S), "the engine's job was left running"
        assert until(lambda: web.admission.running == 0, WAIT_S)
    assert call.closed_at - dropped < 1.0 and call.chunks_sent < 2000


def test_a_reply_whose_client_left_just_before_its_turn_never_reaches_the_engine():
    from starcoder2.errors import NoListener
    from web.guard.admission import Admission

    admission = Admission(1, 4)
    first = admission.enter("a")
    listening = [True]
    second = admission.enter("b", lambda: listening[0])
    waiting = second.wait(poll_s=0.01)
    assert next(waiting) == 0  # waiting, first in line
    listening[0] = False  # its client goes ...
    first.release()  # ... just before its turn comes
    with pytest.raises(NoListener):
        next(waiting)
    assert admission.running == 0 and admission.waiting == 0


# ---- 4. one address must not hold every place on the GPU ----------------------------------------


def test_a_free_place_goes_to_a_newcomer_before_a_client_that_already_runs_replies():
    from web.guard.admission import Admission

    admission = Admission(4, 8)
    hogs = [admission.enter("a") for _ in range(6)]  # 4 run, 2 wait
    newcomer = admission.enter("b")
    assert admission.ahead_of(newcomer) == 0  # it goes before a's extra replies
    hogs[0].release()
    assert newcomer.running and not hogs[4].running and not hogs[5].running
    hogs[1].release()
    assert hogs[4].running  # nobody else waits: a may fill the place again


def test_six_streams_from_one_address_leave_the_next_free_place_to_another_client():
    """Six streamed requests from one address took all 4 places and the next 2 in line; another
    client waited behind them all. Now it gets the first place that frees."""
    engine = FakeEngine(["tok "] * 2000, chunk_delay_s=0.01, max_concurrency=4)
    streams = []

    def start(name: str, address: str, tokens: int) -> None:
        api = openai.OpenAI(
            base_url=f"{url}v1",
            api_key="none",
            max_retries=0,
            timeout=WAIT_S,
            default_headers={"x-forwarded-for": address},
        )
        stream = api.chat.completions.create(
            model=MODEL_ID, messages=[user(name)], stream=True, max_tokens=tokens
        )
        streams.append(stream)
        with contextlib.suppress(Exception):  # closed by the test while it waits: that is all
            next(iter(stream))

    with serve(engine, proxy_hops=1, queue_size=8) as (url, web):
        for name in ("A1", "A2", "A3", "A4"):
            start(name, "10.1.1.1", 2000)
        for name in ("A5", "A6"):
            threading.Thread(target=start, args=(name, "10.1.1.1", 2000), daemon=True).start()
        assert until(lambda: web.admission.waiting == 2, WAIT_S)
        threading.Thread(target=start, args=("B", "10.2.2.2", 2000), daemon=True).start()
        assert until(lambda: web.admission.waiting == 3, WAIT_S)
        streams[0].close()  # A1's client goes: one place frees
        assert until(lambda: len(engine.calls) == 5, WAIT_S)
        started = [call.segments[-2].text.strip() for call in engine.calls]
        for stream in streams:
            stream.close()
    assert "B" in started[4], started


# ---- 5. behind a proxy, the client's own X-Forwarded-For counts for nothing ---------------------

PROXY = "10.9.9.9"  # what the trusted proxy appends: the address the request came from


def forged(n: int) -> dict[str, str]:
    """The header as a client that writes its own first entry arrives through the proxy."""
    return {"x-forwarded-for": f"203.0.113.{n}, {PROXY}"}


def test_forged_forwarded_addresses_do_not_escape_the_rate_limit():
    engine = FakeEngine(["ok"])
    with serve(engine, proxy_hops=1, rate_limit=2) as (url, _):
        codes = [
            httpx.post(
                f"{url}v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=forged(n)
            ).status_code
            for n in range(5)
        ]
        other = httpx.post(
            f"{url}v1/completions",
            json={"prompt": "x", "max_tokens": 1},
            headers={"x-forwarded-for": "10.7.7.7"},
        )
    assert codes == [200, 200, 429, 429, 429] and other.status_code == 200


def test_forged_forwarded_addresses_neither_escape_the_admin_token_throttle_nor_lock_out_others(
    monkeypatch,
):
    from engine import loading as loader_module
    from tests.web.test_app import resolved
    from tests.web.test_security import TOKEN, event_index, public

    engine = FakeEngine()
    monkeypatch.setattr(loader_module, "resolve_model_dir", resolved())
    with serve(engine, public(admin_token=TOKEN, proxy_hops=1)) as (url, web):
        index = event_index(web, "load_clicked")

        def load(token: str, headers: dict[str, str]) -> str:
            body = {"data": ["4_25", 4096, "fp16", token], "fn_index": index}
            return httpx.post(
                f"{url}gradio_api/run/predict", json=body, headers=headers, timeout=WAIT_S
            ).text

        operator = {"x-forwarded-for": "198.51.100.1"}
        for guess in range(5):  # each guess claims to come from the operator's address
            framed = {"x-forwarded-for": f"198.51.100.1, {PROXY}"}
            assert "not the one this server was started with" in load(f"guess {guess}", framed)
        assert "Too many wrong admin tokens" in load("guess 5", forged(5))
        load(TOKEN, operator)  # the operator was never the one guessing
        web.panel.last_load.join(WAIT_S)
    assert [entry["max_seq_len"] for entry in engine.loads] == [4096]


def test_forged_forwarded_addresses_do_not_widen_one_clients_share_of_the_queue():
    gate = threading.Event()
    engine = FakeEngine(["a", "b"], gate=gate, max_concurrency=1)
    with serve(engine, proxy_hops=1, queue_size=8) as (url, web):
        holder = httpx.Client(base_url=url, timeout=WAIT_S)
        body = {"prompt": "x", "stream": True}

        def send(n: int) -> httpx.Response:
            request = holder.build_request("POST", "v1/completions", json=body, headers=forged(n))
            return holder.send(request, stream=True)

        held = send(0)
        next(held.iter_lines())  # the one place, taken
        queued = [send(n) for n in range(1, 5)]  # kept open: their clients still listen
        codes = [response.status_code for response in queued]
        waiting = web.admission.waiting
        gate.set()
        for response in [held, *queued]:
            response.close()
    assert codes == [200, 200, 503, 503] and waiting == 2  # 2 places per client (8 / 4)


# ---- 6. API keys cannot be guessed at speed -----------------------------------------------------

KEY = "sk-test-0123456789abcdef"


def test_wrong_api_keys_are_slowed_per_address_as_logins_are():
    """Keys were checked at ~1,350 guesses a second, never slowed."""
    from web.config import AppConfig

    engine = FakeEngine(["ok"])
    config = AppConfig(api_keys=(KEY,), rate_limit=0, proxy_hops=1)
    with serve(engine, config) as (url, _):

        def client(key: str, address: str) -> openai.OpenAI:
            return openai.OpenAI(
                base_url=f"{url}v1",
                api_key=key,
                max_retries=0,
                timeout=WAIT_S,
                default_headers={"x-forwarded-for": address},
            )

        for guess in range(5):
            with pytest.raises(openai.AuthenticationError):
                client(f"sk-guess-{guess:012d}", "10.6.6.6").models.list()
        with pytest.raises(openai.RateLimitError) as throttled:
            client(KEY, "10.6.6.6").models.list()  # even the right key waits now
        metrics = httpx.get(
            f"{url}metrics",
            headers={"authorization": f"Bearer {KEY}", "x-forwarded-for": "10.6.6.6"},
        )
        elsewhere = client(KEY, "10.5.5.5").chat.completions.create(
            model=MODEL_ID, messages=[user("Hi")]
        )
    retry = int(throttled.value.response.headers["retry-after"])
    assert 0 < retry <= 300 and "Too many wrong API keys" in throttled.value.message
    assert metrics.status_code == 429 and "retry-after" in metrics.headers
    assert elsewhere.choices[0].message.content == "ok" and len(engine.calls) == 1


# ---- 9. empty input -----------------------------------------------------------------------------


def test_an_empty_prompt_asks_for_text_from_the_start_of_a_document_never_zero_tokens(tmp_path):
    """Through the real tokenizer an empty prompt was 0 token ids, which exllamav2 asserts on."""
    from engine.api import GenerationRequest
    from engine.client import EngineProcess
    from starcoder2.settings import SamplingSettings
    from tests.fakes.tiny_starcoder2 import write_tokenizer

    write_tokenizer(tmp_path)
    engine = EngineProcess(backend="tests.fakes.fake_backend:ScriptedBackend")
    try:
        engine.load(str(tmp_path), max_seq_len=2048)
        with serve(engine) as (url, _):
            answer = client_for(url).completions.create(model=MODEL_ID, prompt="", max_tokens=2)
        assert answer.choices[0].text and engine._call("prompts") == [[0]]  # <|endoftext|>
    finally:
        engine.close()
    with pytest.raises(ValueError, match="at least one prompt token"):
        GenerationRequest((), SamplingSettings())


@pytest.mark.parametrize("content", ["", "  \n\t "], ids=["empty", "whitespace"])
def test_an_instruction_with_no_text_gets_a_400_naming_it(content):
    engine = FakeEngine()
    with serve(engine) as (url, _):
        messages = [{"role": "system", "content": "Be brief."}, user(content)]
        response = httpx.post(f"{url}{CHAT}", json={"messages": messages})
    error = error_of(response)
    assert response.status_code == 400 and error["param"] == "messages[1].content"
    assert "is empty" in error["message"] and engine.calls == []


# ---- 10. what this server cannot do is refused, not answered with prose -------------------------

UNSUPPORTED = [
    ({"tool_choice": "required"}, "tool_choice", "'required' is not supported"),
    (
        {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        "tool_choice",
        "naming a tool is not supported",
    ),
    ({"function_call": {"name": "get_weather"}}, "function_call", "calls no functions"),
    ({"response_format": {"type": "json_object"}}, "response_format", "'json_object'"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        "response_format",
        "'json_schema'",
    ),
]


@pytest.mark.parametrize(
    ("fields", "param", "message"), UNSUPPORTED, ids=[u[2][:24] for u in UNSUPPORTED]
)
def test_a_request_for_tools_or_json_the_server_cannot_honour_gets_a_400(fields, param, message):
    engine = FakeEngine(["prose"])
    with serve(engine) as (url, _):
        with pytest.raises(openai.BadRequestError) as raised:
            client_for(url).chat.completions.create(
                model=MODEL_ID, messages=[user("Weather?")], **fields
            )
    error = raised.value.body
    assert error["param"] == param and message in error["message"] and engine.calls == []


def test_tools_offered_with_auto_and_plain_text_output_are_still_served():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    engine = FakeEngine(["prose"])
    with serve(engine) as (url, _):
        answer = client_for(url).chat.completions.create(
            model=MODEL_ID,
            messages=[user("Hi")],
            tools=[tool],
            tool_choice="auto",
            response_format={"type": "text"},
        )
    assert answer.choices[0].message.content == "prose"


# ---- and: errors in OpenAI's shape, no retries that cannot help, a wait that talks ---------------


def test_unknown_routes_and_methods_under_v1_answer_in_openai_shape():
    with serve(FakeEngine()) as (url, _):
        missing = httpx.post(f"{url}v1/embeddings", json={"input": "x"})
        wrong = httpx.get(f"{url}v1/chat/completions")
    assert missing.status_code == 404 and "/v1/embeddings" in error_of(missing)["message"]
    assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"


def test_without_a_gpu_the_official_client_gives_up_at_once_instead_of_retrying():
    """A 503 with Retry-After made the client retry for 20 s; waiting cannot bring a GPU."""
    with serve(FakeEngine(gpu=None, loaded=False)) as (url, _):
        api = openai.OpenAI(base_url=f"{url}v1", api_key="none", timeout=WAIT_S)  # 2 retries
        started = time.perf_counter()
        with pytest.raises(openai.InternalServerError) as raised:
            api.chat.completions.create(model=MODEL_ID, messages=[user("Hi")])
        seconds = time.perf_counter() - started
    headers = raised.value.response.headers
    assert seconds < 2.0 and headers["x-should-retry"] == "false" and "retry-after" not in headers


def test_a_stream_waiting_for_the_gpu_is_sent_comments_so_proxies_keep_it_open():
    gate = threading.Event()
    engine = FakeEngine(["a", "b"], max_concurrency=1, gate=gate)
    with serve(engine) as (url, _):
        holder = httpx.Client(base_url=url, timeout=WAIT_S)
        body = {"prompt": "x", "stream": True}
        with holder.stream("POST", "v1/completions", json=body) as held:
            next(held.iter_lines())
            waiter = httpx.Client(base_url=url, timeout=3.0)  # an idle timeout, as proxies have
            with waiter.stream("POST", "v1/completions", json=body) as waiting:
                lines = waiting.iter_lines()
                first = next(line for line in lines if line)
                gate.set()
                rest = [line for line in lines if line.startswith("data: ")]
    assert first.startswith(": waiting for the GPU, 0 ahead")
    assert rest[-1] == "data: [DONE]"
