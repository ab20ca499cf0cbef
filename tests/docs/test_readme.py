"""Every example in the README's API section runs against the app (the fake engine, on CPU)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from gradio_client.exceptions import AppError

from engine.gpu_check import no_gpu_here
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.serving import serve
from tests.web.test_openai_clients import CONTINUE_AUTOCOMPLETE, CONTINUE_CHAT
from web.config import build_parser, settings_table

ROOT = Path(__file__).resolve().parents[2]
LOCAL = "http://127.0.0.1:7860/"


def api_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]


def block(language: str, containing: str) -> str:
    """The README's API example in `language` whose text contains `containing`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", api_section(), re.S)
    found = [code for code in blocks if containing in code]
    assert len(found) == 1, (
        f"one {language} example with {containing!r} expected, found {len(found)}"
    )
    assert LOCAL.rstrip("/") in found[0]
    return found[0]


def run_python(code: str, url: str) -> list[str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace(LOCAL, url).replace(LOCAL[:-1], url[:-1]), "readme", "exec"), {})
    return printed.getvalue().splitlines()


def test_the_curl_example_streams_server_sent_events():
    engine = FakeEngine(["def reverse(s):", "\n    return s[::-1]"])
    command = block("bash", "curl").replace("\\\n", " ")
    with serve(engine) as (url, _):
        arguments = shlex.split(command.replace(LOCAL[:-1], url[:-1]))
        result = subprocess.run(arguments, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("data: [DONE]")
    assert "return s[::-1]" in result.stdout
    assert engine.calls[0].settings.max_new_tokens == 256


def test_the_openai_client_example_prints_the_streamed_answer():
    engine = FakeEngine(["def reverse(s):", "\n    return s[::-1]"])
    with serve(engine) as (url, _):
        printed = run_python(block("python", "from openai import OpenAI"), url)
    assert printed == ["def reverse(s):", "    return s[::-1]"]


def test_the_gradio_client_example_streams_an_answer():
    engine = FakeEngine(["def reverse(s):", "\n    return s[::-1]"])
    with serve(engine) as (url, _):
        printed = run_python(block("python", "from gradio_client import Client"), url)
    assert printed[-1] == "    return s[::-1]" and "def reverse(s):" in printed
    assert engine.calls[0].settings.seed == 1234


def test_the_openai_client_example_fails_at_once_with_the_reason_without_a_gpu():
    with serve(FakeEngine(gpu=None, loaded=False)) as (url, _):
        started = time.perf_counter()
        with pytest.raises(openai.InternalServerError) as raised:
            run_python(block("python", "from openai import OpenAI"), url)
        took = time.perf_counter() - started
    assert raised.value.status_code == 503 and no_gpu_here() in str(raised.value)
    assert took < 3, f"the client retried for {took:.1f} s"  # waiting cannot bring a GPU


def test_the_gradio_client_example_raises_the_apps_error_without_a_gpu():
    with serve(FakeEngine(gpu=None, loaded=False)) as (url, _):
        with pytest.raises(AppError) as raised:
            run_python(block("python", "from gradio_client import Client"), url)
    assert str(raised.value) == no_gpu_here()


def test_the_continue_config_reaches_chat_and_autocomplete():
    config = yaml.safe_load(block("yaml", "provider: openai"))
    roles = {role: model for model in config["models"] for role in model["roles"]}
    assert {"chat", "autocomplete"} <= set(roles)
    engine = FakeEngine(["ok"])
    with serve(engine) as (url, _):
        for role, path, body in (
            ("chat", "/chat/completions", CONTINUE_CHAT),
            ("autocomplete", "/completions", CONTINUE_AUTOCOMPLETE),
        ):
            model = roles[role]
            assert model["provider"] == "openai"
            base = model["apiBase"].replace(LOCAL[:-1], url[:-1])
            headers = {"Authorization": f"Bearer {model['apiKey']}"}
            response = httpx.post(
                base + path, json={**body, "model": model["model"]}, headers=headers, timeout=15
            )
            assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")


def test_the_quick_start_is_two_commands_and_says_how_to_run_them_side_by_side():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    (commands,) = re.findall(r"```bash\n(.*?)```", quick, re.S)
    app, tests = [line.split("#")[0].strip() for line in commands.strip().splitlines()]
    assert app.endswith("python app.py") and tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().replace("pip install -q", "pip install")
    assert tests in ci  # CI runs what a newcomer runs
    for advice in ("python -m venv", "keeps serving until Ctrl+C", "second terminal", "chromium"):
        assert advice in quick.replace("\n", " "), advice


# ---- Settings -----------------------------------------------------------------------------------


def settings_rows() -> list[str]:
    """The README's Settings table, line by line."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_the_settings_table_is_the_option_table_that_help_is_made_from():
    assert settings_rows() == settings_table().splitlines(), (
        "regenerate the README's Settings table from "
        "`python -c 'from web.config import settings_table; print(settings_table())'`"
    )


def test_help_gives_every_flag_in_the_readme_the_same_variables_default_and_meaning(
    monkeypatch,
):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: a hyphen may end a wrapped line
    help_text = build_parser().format_help()
    for row in settings_rows()[2:]:
        flag, env, default, meaning = (
            re.sub(r"`|\*\*", "", cell).strip() for cell in row.strip("|").split(" | ")
        )
        assert flag in help_text
        described = f"{meaning} (env {env.replace(', ', ' / ')}; default: {default})"
        assert described in help_text, f"--help and the README differ on {flag}"
    assert "--api-key" in help_text and "16+ characters" in help_text
    assert "default: the first GPU" in help_text
