"""The OpenAI-compatible routes, driven by the official `openai` client and raw HTTP (CPU).

The app runs as main() launches it (tests.fakes.serving) on the fake engine, which honours stop
strings and max tokens as the real engine does.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from gradio_client import Client

from engine.gpu_check import no_gpu_here
from starcoder2.errors import GenerationFailed
from starcoder2.prompt import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, build_prompt
from starcoder2.settings import FIELDS
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.serving import serve
from tests.web.test_reliability import until
from web.config import AppConfig
from web.openai.routes import MODEL_ID

openai = pytest.importorskip("openai")  # a GPU machine's kit may lack it

WAIT_S = 15
KEY = "sk-test-0123456789abcdef"


def client_for(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}v1", api_key=key, max_retries=0, timeout=WAIT_S)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def sent_text(engine: FakeEngine) -> str:
    return "".join(segment.text for segment in engine.calls[-1].segments)


# ---- chat ---------------------------------------------------------------------------------------


def test_chat_answers_whole_with_usage_through_the_chat_template():
    engine = FakeEngine(["def add(a, b):", "\n    return a + b"])
    with serve(engine) as (url, _):
        messages = [
            {"role": "system", "content": "Answer in Python."},
            user("Write add."),
            {"role": "assistant", "content": "Which language?"},
            user("Python."),
        ]
        answer = client_for(url).chat.completions.create(model=MODEL_ID, messages=messages)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "def add(a, b):\n    return a + b"
    assert choice.finish_reason == "stop" and answer.object == "chat.completion"
    conversation = [user("Write add."), {"role": "assistant", "content": "Which language?"}]
    assert sent_text(engine) == build_prompt(
        [*conversation, user("Python.")], system="Answer in Python."
    )
    assert not any(
        segment.trusted and "Python." in segment.text for segment in engine.calls[-1].segments
    )
    usage = answer.usage
    assert usage.prompt_tokens == len(engine.calls[-1].ids) and usage.completion_tokens == 2
    assert usage.total_tokens == usage.prompt_tokens + 2
    assert usage.prompt_tokens_details.cached_tokens == 0


def test_chat_streams_deltas_then_a_finish_reason_and_usage_when_asked():
    engine = FakeEngine(["Hel", "lo", "!"])
    with serve(engine) as (url, _):
        chunks = list(
            client_for(url).chat.completions.create(
                model=MODEL_ID,
                messages=[user("Hi")],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello!"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")


def test_stop_strings_end_the_reply_and_max_tokens_gives_length():
    engine = FakeEngine(["one", " two", "\n\n", "three"])
    with serve(engine) as (url, _):
        api = client_for(url)
        stopped = api.chat.completions.create(
            model=MODEL_ID, messages=[user("Count.")], stop=["\n\n", "END"]
        )
        short = api.chat.completions.create(model=MODEL_ID, messages=[user("Count.")], max_tokens=2)
        single = api.completions.create(model=MODEL_ID, prompt="Count:", stop=" two")
    assert stopped.choices[0].message.content == "one two"
    assert stopped.choices[0].finish_reason == "stop"
    assert engine.calls[0].stop[-2:] == ("\n\n", "END")  # after the template's own
    assert (
        short.choices[0].message.content == "one two" and short.choices[0].finish_reason == "length"
    )
    assert single.choices[0].text == "one" and engine.calls[-1].stop == (" two",)


def test_max_tokens_is_an_upper_bound_within_the_room_the_prompt_leaves():
    engine = FakeEngine(["x"], max_seq_len=4096)
    with serve(engine) as (url, _):
        api = client_for(url)
        api.chat.completions.create(model=MODEL_ID, messages=[user("Hi")])
        api.chat.completions.create(model=MODEL_ID, messages=[user("Hi")], max_tokens=7)
        api.chat.completions.create(model=MODEL_ID, messages=[user("Hi")], max_tokens=4096)
        api.completions.create(model=MODEL_ID, prompt="def f():")
    free = 4096 - len(engine.calls[0].ids)
    assert engine.calls[0].settings.max_new_tokens == free  # chat: the rest of the context
    assert engine.calls[1].settings.max_new_tokens == 7
    assert engine.calls[2].settings.max_new_tokens == free  # Continue's default on a 4k context
    assert engine.calls[3].settings.max_new_tokens == 16  # completions: OpenAI's default


def test_a_chat_without_max_tokens_on_a_long_context_stops_at_the_largest_max_tokens():
    engine = FakeEngine(["x"], max_seq_len=32768)
    with serve(engine) as (url, _):
        client_for(url).chat.completions.create(model=MODEL_ID, messages=[user("Hi")])
    assert engine.calls[0].settings.max_new_tokens == 8192  # as README's max_tokens row says


def test_sampling_fields_reach_the_engine_and_unknown_fields_are_ignored():
    engine = FakeEngine(["ok"])
    with serve(engine) as (url, _):
        client_for(url).chat.completions.create(
            model="anything",
            messages=[user("Hi")],
            temperature=0.7,
            top_p=0.9,
            seed=42,
            max_tokens=64,
            presence_penalty=0,
            user="someone",
            extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "frobnicate": 1},
        )
    settings = engine.calls[0].settings
    assert (settings.temperature, settings.top_p, settings.seed) == (0.7, 0.9, 42)
    assert (settings.top_k, settings.min_p, settings.repetition_penalty) == (40, 0.05, 1.1)
    assert settings.max_new_tokens == 64


# ---- completions --------------------------------------------------------------------------------


def test_completions_send_the_raw_prompt_with_its_special_tokens():
    engine = FakeEngine(["    return a + b"])
    with serve(engine) as (url, _):
        answer = client_for(url).completions.create(
            model=MODEL_ID, prompt="<|endoftext|>def add(a, b):\n", max_tokens=16
        )
    assert answer.choices[0].text == "    return a + b" and answer.object == "text_completion"
    (segment,) = engine.calls[0].segments
    assert segment.text == "<|endoftext|>def add(a, b):\n" and segment.trusted
    assert engine.calls[0].stop == ()  # no chat template, so none of its stop strings


def test_a_suffix_makes_a_fill_in_the_middle_prompt_and_it_streams():
    engine = FakeEngine(["a + ", "b"])
    with serve(engine) as (url, _):
        chunks = list(
            client_for(url).completions.create(
                model=MODEL_ID,
                prompt="def add(a, b):\n    return ",
                suffix="\n\nprint(add(1, 2))\n",
                max_tokens=16,
                stream=True,
            )
        )
    assert "".join(c.choices[0].text for c in chunks) == "a + b"
    assert chunks[-1].choices[0].finish_reason == "stop"
    (segment,) = engine.calls[0].segments
    assert segment.trusted and segment.text == (
        f"{FIM_PREFIX}def add(a, b):\n    return {FIM_SUFFIX}\n\nprint(add(1, 2))\n{FIM_MIDDLE}"
    )


def test_models_lists_the_one_model_served():
    with serve(FakeEngine()) as (url, _):
        models = client_for(url).models.list()
    assert [model.id for model in models.data] == [MODEL_ID]


def test_models_says_why_nothing_can_serve_instead_of_listing_the_model():
    with serve(FakeEngine(gpu=None, loaded=False)) as (url, _):
        no_gpu = httpx.get(f"{url}v1/models")
    with serve(FakeEngine(loaded=False)) as (url, _):
        no_model = httpx.get(f"{url}v1/models")
    assert no_gpu.status_code == 503 and error_of(no_gpu)["message"] == no_gpu_here()
    assert no_gpu.headers["x-should-retry"] == "false"  # clients fail at once, not in 20 s
    assert (
        no_model.status_code == 503
        and "Load one in the Model panel" in error_of(no_model)["message"]
    )


# ---- errors -------------------------------------------------------------------------------------


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def hi(**fields) -> dict:
    """A chat request saying "Hi", with `fields` added."""
    return {"messages": [user("Hi")], **fields}


BAD_REQUESTS = [
    (hi(temperature="hot"), "temperature", "temperature must be a number between 0 and 2"),
    (hi(temperature=5), "temperature", "temperature must be between 0 and 2 (got 5)"),
    (hi(max_tokens=0), "max_tokens", "max_tokens must be between 1 and 8192 (got 0)"),
    (hi(top_p=1.5), "top_p", "top_p must be between 0.01 and 1 (got 1.5)"),
    (hi(n=2), "n", "n must be 1"),
    (hi(stop=[1, 2]), "stop", "expected a string or a list of strings"),
    (hi(stop=[f"s{n}" for n in range(17)]), "stop", "at most 16 strings (got 17)"),
    (hi(stream="yes"), "stream", "expected a boolean"),
    ({"messages": []}, "messages", "messages must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "role is 'tool'"),
    ({"messages": [user("a\x00b")]}, "messages[0].content", "control character U+0000"),
    ({"messages": [user("a"), user("b")]}, "messages", "Message 2 has role 'user'"),
    ({"messages": [user("x" * 100_000)]}, "messages", "but the context is 4,096 tokens"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param", "message"), BAD_REQUESTS, ids=[p for _, p, _ in BAD_REQUESTS]
)
def test_bad_requests_get_a_400_in_openai_shape_naming_the_field(body, param, message):
    engine = FakeEngine()
    with serve(engine) as (url, _):
        response = httpx.post(f"{url}v1/chat/completions", json={"model": MODEL_ID, **body})
        with pytest.raises(openai.BadRequestError) as raised:
            client_for(url).chat.completions.create(model=MODEL_ID, **body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert raised.value.status_code == 400 and message in raised.value.message
    assert engine.calls == []


def test_a_body_that_is_not_json_gets_a_400():
    with serve(FakeEngine()) as (url, _):
        response = httpx.post(
            f"{url}v1/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert (
        response.status_code == 400 and "could not parse the JSON" in error_of(response)["message"]
    )


def test_an_api_key_is_required_once_one_is_set():
    engine = FakeEngine(["ok"])
    with serve(engine, AppConfig(api_keys=(KEY, "sk-second-key-000000"), rate_limit=0)) as (url, _):
        with pytest.raises(openai.AuthenticationError) as raised:
            client_for(url, "wrong").chat.completions.create(model=MODEL_ID, messages=[user("Hi")])
        missing = httpx.post(f"{url}v1/chat/completions", json={"messages": [user("Hi")]})
        assert client_for(url, KEY).models.list().data[0].id == MODEL_ID
        answer = client_for(url, "sk-second-key-000000").chat.completions.create(
            model=MODEL_ID, messages=[user("Hi")]
        )
        metrics_closed = httpx.get(f"{url}metrics")
        metrics_open = httpx.get(f"{url}metrics", headers={"authorization": f"Bearer {KEY}"})
    assert raised.value.status_code == 401 and "incorrect API key" in raised.value.message
    assert missing.status_code == 401 and error_of(missing)["code"] == "invalid_api_key"
    assert answer.choices[0].message.content == "ok"
    assert metrics_closed.status_code == 401 and metrics_open.status_code == 200
    assert len(engine.calls) == 1


def test_behind_a_login_the_api_is_closed_until_a_key_is_set():
    with serve(FakeEngine(), AppConfig(auth="me:secret", rate_limit=0)) as (url, _):
        response = httpx.get(f"{url}v1/models")
    assert response.status_code == 401 and "--api-key" in error_of(response)["message"]


def test_the_rate_limit_answers_429_with_retry_after():
    engine = FakeEngine(["ok"])
    with serve(engine, AppConfig(rate_limit=1)) as (url, _):
        client_for(url).chat.completions.create(model=MODEL_ID, messages=[user("Hi")])
        response = httpx.post(f"{url}v1/chat/completions", json={"messages": [user("Hi")]})
    assert response.status_code == 429 and int(response.headers["retry-after"]) > 0
    error = error_of(response)
    assert error["code"] == "rate_limit_exceeded" and "limit is 1 per minute" in error["message"]
    assert len(engine.calls) == 1


def test_without_a_gpu_or_a_model_it_answers_503_with_the_reason_but_bad_input_first():
    with serve(FakeEngine(gpu=None, loaded=False)) as (url, _):
        no_gpu = httpx.post(f"{url}v1/chat/completions", json={"messages": [user("Hi")]})
        bad = httpx.post(f"{url}v1/chat/completions", json={"messages": [user("Hi")], "n": 3})
    with serve(FakeEngine(loaded=False)) as (url, _):
        no_model = httpx.post(f"{url}v1/completions", json={"prompt": "def"})
    assert no_gpu.status_code == 503 and "No GPU to run the model" in error_of(no_gpu)["message"]
    assert bad.status_code == 400
    assert no_model.status_code == 503 and "not ready" in error_of(no_model)["message"]


def test_a_full_queue_answers_503():
    gate = threading.Event()
    engine = FakeEngine(["a", "b"], max_concurrency=1, gate=gate)
    with serve(engine, queue_size=0) as (url, _):
        holder = httpx.Client(base_url=url, timeout=WAIT_S)
        with holder.stream("POST", "v1/completions", json={"prompt": "x", "stream": True}) as held:
            next(held.iter_lines())
            full = httpx.post(f"{url}v1/completions", json={"prompt": "y"})
            gate.set()
    assert full.status_code == 503 and "queue is full" in error_of(full)["message"]
    assert "retry-after" in full.headers


# ---- streams, disconnects and the shared queue --------------------------------------------------


def test_a_client_that_disconnects_mid_stream_cancels_its_job_within_a_second():
    engine = FakeEngine(["tok "] * 2000, chunk_delay_s=0.01)
    with serve(engine) as (url, _):
        with httpx.stream(
            "POST", f"{url}v1/chat/completions", json={"messages": [user("Go")], "stream": True}
        ) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            (call,) = engine.calls
        dropped = time.perf_counter()
        assert call.closed_event.wait(WAIT_S), "the engine's job was left running"
    assert call.closed_at - dropped < 1.0 and call.chunks_sent < 2000


def test_a_chat_reply_and_an_api_request_share_one_queue():
    gate = threading.Event()
    engine = FakeEngine(["a", "b"], max_concurrency=1, gate=gate)
    with serve(engine) as (url, web):
        defaults = [spec.default for spec in FIELDS]
        chat = web.fn("respond")([user("Hold the GPU.")], "", "", *defaults, None)
        next(chat), next(chat)  # "Generating…", then "a": the chat holds the only place
        result = {}
        waiting = threading.Thread(
            target=lambda: result.update(
                answer=client_for(url).chat.completions.create(
                    model=MODEL_ID, messages=[user("Me too.")]
                )
            )
        )
        waiting.start()
        assert until(lambda: web.admission.waiting == 1, WAIT_S)  # the API request waits its turn
        gate.set()
        list(chat)
        waiting.join(WAIT_S)
    assert result["answer"].choices[0].message.content == "ab"


def test_a_plain_curl_stream_reads_as_server_sent_events_ending_in_done():
    engine = FakeEngine(["Hi", " there"])
    with serve(engine) as (url, _):
        raw = httpx.post(
            f"{url}v1/chat/completions",
            json={"model": MODEL_ID, "messages": [user("Hi")], "stream": True},
            headers={"accept": "*/*", "user-agent": "curl/8.5.0"},
        )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [block for block in raw.text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events) and events[-1] == "data: [DONE]"
    deltas = [
        json.loads(block[6:])["choices"][0]["delta"].get("content", "") for block in events[:-1]
    ]
    assert "".join(deltas) == "Hi there"


def test_a_failure_after_the_stream_started_is_sent_as_an_error_event():
    engine = FakeEngine(["a", "b", "c"])
    engine.fail_next(RuntimeError("CUDA error at 0xdead"), after_chunks=1)
    with serve(engine) as (url, _):
        raw = httpx.post(f"{url}v1/completions", json={"prompt": "x", "stream": True})
    events = [
        json.loads(block[6:]) for block in raw.text.split("\n\n") if block.startswith("data: {")
    ]
    assert events[0]["choices"][0]["text"] == "a"
    assert events[-1]["error"]["type"] == "server_error" and "0xdead" not in raw.text


def test_metrics_count_requests_tokens_latency_queue_and_cache():
    engine = FakeEngine(["a", "b"])
    with serve(engine) as (url, _):
        api = client_for(url)
        api.chat.completions.create(model=MODEL_ID, messages=[user("Hi")])
        with pytest.raises(openai.BadRequestError):
            api.chat.completions.create(model=MODEL_ID, messages=[user("Hi")], n=2)
        text = httpx.get(f"{url}metrics").text
    assert 'sc2_requests_total{endpoint="chat_completions",status="200"} 1' in text
    assert 'sc2_requests_total{endpoint="chat_completions",status="400"} 1' in text
    assert "sc2_generated_tokens_total 2" in text
    assert 'sc2_time_to_first_token_seconds_bucket{le="0.05"} 1' in text
    assert "sc2_time_per_output_token_seconds_count 1" in text
    for gauge in (
        "queue_waiting 0",
        "replies_running 0",
        "kv_cache_pages_used 0",
        "kv_cache_pages 64",
    ):
        assert f"sc2_{gauge}" in text


def requests_counted(url: str) -> dict[tuple[str, str], float]:
    """sc2_requests_total by (endpoint, status), as /metrics says it."""
    counted = {}
    for line in httpx.get(f"{url}metrics").text.splitlines():
        found = re.match(r'sc2_requests_total\{endpoint="(\w+)",status="(\d+)"\} (\S+)', line)
        if found:
            counted[(found.group(1), found.group(2))] = float(found.group(3))
    return counted


def test_every_reply_is_counted_once_with_its_outcome_on_every_route():
    engine = FakeEngine(["tok "] * 40, chunk_delay_s=0.02)
    with serve(engine) as (url, web):
        api = client_for(url)
        api.chat.completions.create(model=MODEL_ID, messages=[user("Whole.")])  # 200
        with httpx.stream(
            "POST", f"{url}v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 40}
        ) as hung_up:
            next(hung_up.iter_lines())  # one chunk, then the client leaves: 499
        engine.fail_next(GenerationFailed("Generation failed (out of GPU memory)."))
        with pytest.raises(openai.APIError):
            list(api.completions.create(model=MODEL_ID, prompt="x", stream=True))  # 500
        chat = web.fn("respond")(
            [user("Stopped.")], "", "", *[spec.default for spec in FIELDS], None
        )
        next(chat), next(chat)  # "Generating…", a token; then Stop: 499
        chat.close()
        list(
            web.fn("respond")([user("Answered.")], "", "", *[spec.default for spec in FIELDS], None)
        )  # 200
        Client(url, verbose=False).predict("Generated.", api_name="/generate")  # 200
        expected = {
            ("chat_completions", "200"): 1,
            ("completions", "499"): 1,
            ("completions", "500"): 1,
            ("chat", "499"): 1,
            ("chat", "200"): 1,
            ("generate", "200"): 1,
        }
        assert until(lambda: requests_counted(url) == expected, WAIT_S), requests_counted(url)
