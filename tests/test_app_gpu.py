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
