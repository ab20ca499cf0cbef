"""The app on a GPU with the real engine and the tiny EXL2 model (`pytest -m gpu`)."""

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)", allow_module_level=True)

from gradio_client import Client  # noqa: E402

import app  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.prompt import prompt_segments  # noqa: E402
from model.settings import SamplingSettings  # noqa: E402

pytestmark = pytest.mark.gpu


def test_generate_api_answers_with_the_engines_own_greedy_text(exl2_dir):
    engine = Engine()
    engine.load(str(exl2_dir), max_seq_len=2048)
    question = "Write a function that sorts a list."
    settings = SamplingSettings(max_new_tokens=32)
    direct = list(engine.stream(prompt_segments([{"role": "user", "content": question}]), settings))
    demo = app.build_demo(engine, app.AppConfig())
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(url, verbose=False)
        streamed = list(client.submit(question, max_new_tokens=32, api_name="/generate"))
        answer = client.predict(question, max_new_tokens=32, api_name="/generate")
    finally:
        demo.close()
        engine.close()
    assert answer == direct[-1].text
    assert streamed and streamed[-1] == answer
    assert len(streamed) > 1  # it streamed, not one final blob


def test_chat_answers_and_a_follow_up_turn_reuses_the_cached_prompt_pages(exl2_dir):
    from model.settings import FIELDS

    engine = Engine()
    engine.load(str(exl2_dir), max_seq_len=2048)
    demo = app.build_demo(engine, app.AppConfig())
    respond = next(fn.fn for fn in demo.fns.values() if fn.name == "respond")
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
    first_stats = [y[2] for y in first if isinstance(y[2], str) and "stopped by" in y[2]]
    second_stats = [y[2] for y in second if isinstance(y[2], str) and "stopped by" in y[2]]
    assert first_stats and "cached" not in first_stats[-1]
    assert second_stats and "of them cached" in second_stats[-1]  # the first turn's full pages
