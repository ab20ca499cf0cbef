"""The app on a GPU: the real engine in its own process, the tiny EXL2 model (`pytest -m gpu`).

The tiny model's logits are near-ties and exllamav2's EXL2 matmuls add partial sums with atomics,
so two runs of one greedy prompt may pick different tokens. These tests therefore compare what
reached the engine and what the engine itself streamed for that very request, never two runs.
"""

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)", allow_module_level=True)

from gradio_client import Client  # noqa: E402

from engine.api import Finished  # noqa: E402
from engine.client import EngineProcess  # noqa: E402
from starcoder2.prompt import prompt_segments  # noqa: E402
from starcoder2.settings import FIELDS, SamplingSettings  # noqa: E402
from tests.fakes.serving import serve  # noqa: E402
from web.server import build_app  # noqa: E402

pytestmark = pytest.mark.gpu


class Recording(EngineProcess):
    """The client of the real engine process, keeping each request and what came back for it."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[tuple[object, list]] = []

    def stream(self, request):
        events: list = []
        self.streams.append((request, events))
        for event in super().stream(request):
            events.append(event)
            yield event


def test_generate_api_streams_exactly_what_the_engine_wrote_for_its_prompt(exl2_dir):
    engine = Recording()
    engine.load(str(exl2_dir), max_seq_len=2048)
    question = "Write a function that sorts a list."
    try:
        with serve(engine) as (url, _):
            client = Client(url, verbose=False)
            streamed = list(client.submit(question, max_new_tokens=32, api_name="/generate"))
    finally:
        engine.close()
    ((request, events),) = engine.streams
    assert list(request.segments) == prompt_segments([{"role": "user", "content": question}])
    assert list(request.ids) == engine.encode(request.segments)
    assert request.settings == SamplingSettings(max_new_tokens=32)
    assert isinstance(events[-1], Finished) and events[-1].new_tokens > 1
    assert streamed and streamed[-1] == events[-1].text
    assert len(streamed) > 1  # it streamed, not one final blob


def test_chat_answers_and_a_follow_up_turn_reuses_the_cached_prompt_pages(exl2_dir):
    engine = EngineProcess()
    engine.load(str(exl2_dir), max_seq_len=2048)
    web = build_app(engine)
    respond = web.fn("respond")
    values = [32 if spec.name == "max_new_tokens" else spec.default for spec in FIELDS]
    question = "Explain this code step by step:\n" + "total = sum(x * x for x in range(10))\n" * 30
    try:
        first = list(respond([{"role": "user", "content": question}], "", "", *values, None))
        chat = first[-1][0]
        follow_up = [*chat, {"role": "user", "content": "Now write it in Rust."}]
        second = list(respond(follow_up, "", "", *values, None))
    finally:
        engine.close()
    assert chat[-1]["role"] == "assistant" and chat[-1]["content"]
    first_stats = [u[1] for u in first if isinstance(u[1], str) and "tok/s" in u[1]]
    second_stats = [u[1] for u in second if isinstance(u[1], str) and "tok/s" in u[1]]
    assert first_stats and "cached" not in first_stats[-1]
    assert second_stats and "of them cached" in second_stats[-1]  # the first turn's full pages


def test_the_openai_chat_route_gives_the_chats_own_greedy_answer(decisive_dir):
    openai = pytest.importorskip("openai")  # a GPU machine's kit may lack it

    engine = EngineProcess()
    engine.load(str(decisive_dir), max_seq_len=2048)
    question = [{"role": "user", "content": "Write a function that sorts a list."}]
    values = [48 if spec.name == "max_new_tokens" else spec.default for spec in FIELDS]
    try:
        with serve(engine) as (url, web):
            chat = list(web.fn("respond")(question, "", "", *values, None))[-1][0][-1]["content"]
            api = openai.OpenAI(base_url=f"{url}v1", api_key="none", max_retries=0)
            answer = api.chat.completions.create(
                model="starcoder2", messages=question, max_tokens=48, temperature=0
            )
    finally:
        engine.close()
    assert answer.choices[0].message.content == chat and len(chat) > 0
    assert answer.usage.completion_tokens > 1
