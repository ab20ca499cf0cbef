"""Requests in the shapes real editor clients send, replayed byte for byte against the app (CPU).

Shapes read from the clients' sources:
- Continue (continuedev/continue d0a3c0b6, openai-node 5.23.2): chat through the OpenAI SDK with
  stream_options; tab autocomplete builds the fill-in-the-middle prompt itself and posts only
  `prompt` to /v1/completions, with up to 12 stop strings and max_tokens 4096.
- llm-ls (huggingface/llm-ls 1c52b94f, 0.5.4), its "openai" backend: non-streaming /v1/completions,
  keys sorted, no max_tokens; it reads choices[*].text.
"""

from __future__ import annotations

import json

import httpx

from starcoder2.prompt import fim_prompt
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.serving import serve

WAIT_S = 15
CONTINUE_HEADERS = {
    "Authorization": "Bearer sk-test",
    "Content-Type": "application/json",
    "Accept": "application/json",
    "User-Agent": "OpenAI/JS 5.23.2",
    "X-Stainless-Retry-Count": "0",
    "X-Stainless-Lang": "js",
    "X-Stainless-Runtime": "node",
}
CONTINUE_CHAT = {
    "messages": [
        {
            "role": "system",
            "content": "<important_rules>\n  You are in chat mode.\n</important_rules>",
        },
        {"role": "user", "content": "Hello"},
    ],
    "model": "starcoder2-15b-instruct",
    "max_tokens": 4096,
    "stream": True,
    "stream_options": {"include_usage": True},
}
CONTINUE_AGENT_EXTRAS = {  # agent mode adds tools, which this server ignores
    "tools": [
        {
            "type": "function",
            "function": {"name": "read_file", "description": "Read a file", "parameters": {}},
        }
    ],
    "parallel_tool_calls": False,
}
CONTINUE_STOPS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>",
    "<file_sep>", "<issue_start>", "\n\n\n", "/src/", "#- coding: utf-8", "```",
]  # fmt: skip
CONTINUE_AUTOCOMPLETE = {
    "model": "starcoder2-15b-instruct",
    "max_tokens": 4096,
    "temperature": 0.01,
    "stream": True,
    "stop": CONTINUE_STOPS,
    "prompt": fim_prompt("def add(a, b):\n    ", "\n"),
}
CONTINUE_FETCH_HEADERS = {
    "Content-Type": "application/json",
    "Authorization": "Bearer sk-test",
    "api-key": "sk-test",
    "Accept": "*/*",
    "User-Agent": "node-fetch",
}
LLM_LS = {  # serde_json without preserve_order: keys sorted
    "model": "bigcode/starcoder2-15b",
    "prompt": fim_prompt("def add(a, b):\n    ", "\n"),
    "stream": False,
    "temperature": 0.2,
    "top_p": 0.95,
}
LLM_LS_HEADERS = {
    "user-agent": "llm-ls/0.5.4; rust/unknown; ide/VSCode",
    "content-type": "application/json",
    "accept": "*/*",
}


def post(url: str, path: str, body: dict, headers: dict) -> httpx.Response:
    payload = json.dumps(body, separators=(",", ":")).encode()
    return httpx.post(f"{url}{path}", content=payload, headers=headers, timeout=WAIT_S)


def data_events(response: httpx.Response) -> list:
    return [
        json.loads(block[6:])
        for block in response.text.split("\n\n")
        if block.startswith("data: ") and block != "data: [DONE]"
    ]


def test_continue_chat_streams_with_usage_and_ignores_agent_tools():
    engine = FakeEngine(["Hello", "! How can I help?"])
    with serve(engine) as (url, _):
        for body in (CONTINUE_CHAT, {**CONTINUE_CHAT, **CONTINUE_AGENT_EXTRAS}):
            response = post(url, "v1/chat/completions", body, CONTINUE_HEADERS)
            assert response.status_code == 200, response.text
            events = data_events(response)
            text = "".join(
                e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]
            )
            assert text == "Hello! How can I help?"
            assert events[-1]["usage"]["completion_tokens"] == 2
            assert response.text.endswith("data: [DONE]\n\n")
    sent = "".join(segment.text for segment in engine.calls[0].segments)
    assert "You are in chat mode." in sent and "Hello" in sent


def test_continue_autocomplete_gets_the_middle_for_its_own_fim_prompt():
    engine = FakeEngine(["return a + b", "\n\n\n", "print(1)"])
    with serve(engine) as (url, _):
        response = post(url, "v1/completions", CONTINUE_AUTOCOMPLETE, CONTINUE_FETCH_HEADERS)
    assert response.status_code == 200, response.text
    events = data_events(response)
    assert "".join(e["choices"][0]["text"] for e in events) == "return a + b"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    call = engine.calls[0]
    assert call.stop == tuple(CONTINUE_STOPS) and call.settings.temperature == 0.01
    (segment,) = call.segments
    assert segment.trusted and segment.text == CONTINUE_AUTOCOMPLETE["prompt"]


def test_llm_ls_gets_a_whole_completion_with_choices_text():
    engine = FakeEngine(["return a + b"])
    with serve(engine) as (url, _):
        response = post(url, "v1/completions", LLM_LS, LLM_LS_HEADERS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [choice["text"] for choice in body["choices"]] == ["return a + b"]
    settings = engine.calls[0].settings
    assert (settings.temperature, settings.top_p) == (0.2, 0.95)
    assert settings.max_new_tokens == 16  # no max_tokens: OpenAI's default for completions
