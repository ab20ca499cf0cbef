"""Configuration: flags win over environment variables, which win over defaults."""

import subprocess
import sys
from pathlib import Path

import pytest

from web.config import parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_max_jobs_defaults_to_eight_and_reads_flag_then_environment():
    assert parse_config([], {}).max_jobs == 8
    assert parse_config([], {"SC2_MAX_JOBS": "4"}).max_jobs == 4
    assert parse_config(["--max-jobs", "16"], {"SC2_MAX_JOBS": "4"}).max_jobs == 16


@pytest.mark.parametrize("value", ["0", "65", "-1"])
def test_max_jobs_outside_1_to_64_is_refused_with_the_range(value, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--max-jobs", value], {})
    assert "--max-jobs must be between 1 and 64" in capsys.readouterr().err


def error_line(capsys, argv: list[str], environ: dict[str, str]) -> str:
    """The one line parse_config refuses with (argparse prints the usage above it)."""
    with pytest.raises(SystemExit) as exited:
        parse_config(argv, environ)
    assert exited.value.code == 2
    *_, line = capsys.readouterr().err.strip().splitlines()
    prefix = "app.py: error: "
    assert line.startswith(prefix), line
    return line.removeprefix(prefix)


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--port", "99999", "--port must be between 1 and 65535 (got 99999)"),
        ("--port", "-1", "--port must be between 1 and 65535 (got -1)"),
        ("--port", "abc", "--port must be a whole number (got 'abc')"),
        ("--context", "100", "--context must be a multiple of 256 from 256 to 32,768"),
        ("--branch", "9_9", "--branch must be auto or one of 3_5, 4_25"),
        ("--stall-timeout", "soon", "--stall-timeout must be a number (got 'soon')"),
        ("--gpus", "0,0", "--gpus must be distinct GPU numbers"),
        ("--api-key", "short", "--api-key: each key must be at least 16 characters"),
        ("--queue-size", "-1", "--queue-size must be 0 or more (got -1)"),
    ],
)
def test_a_flag_error_names_the_flag_the_range_and_the_value(flag, value, words, capsys):
    assert error_line(capsys, [flag, value], {}).startswith(words)


@pytest.mark.parametrize(
    ("variable", "value", "flag", "words"),
    [
        ("SC2_PORT", "99999", "--port", "SC2_PORT must be between 1 and 65535 (got 99999)"),
        ("GRADIO_SERVER_PORT", "0", "--port", "GRADIO_SERVER_PORT must be between 1 and 65535"),
        ("SC2_PORT", "abc", "--port", "SC2_PORT must be a whole number (got 'abc')"),
        ("SC2_CONTEXT", "100", "--context", "SC2_CONTEXT must be a multiple of 256"),
        ("SC2_BRANCH", "9_9", "--branch", "SC2_BRANCH must be auto or one of 3_5"),
        ("SC2_MAX_JOBS", "many", "--max-jobs", "SC2_MAX_JOBS must be a whole number"),
        ("SC2_STALL_TIMEOUT", "nan", "--stall-timeout", "SC2_STALL_TIMEOUT must be between 1"),
        ("SC2_GPUS", "0,0", "--gpus", "SC2_GPUS must be distinct GPU numbers"),
        ("SC2_API_KEY", "short", "--api-key", "SC2_API_KEY: each key must be at least 16"),
        ("SC2_ADMIN_TOKEN", "short", "--admin-token", "SC2_ADMIN_TOKEN must be at least 12"),
    ],
)
def test_an_environment_variable_error_names_the_variable_not_the_flag(
    variable, value, flag, words, capsys
):
    line = error_line(capsys, [], {variable: value})
    assert line.startswith(words) and flag not in line


def test_a_flag_wins_over_a_bad_variable_and_its_error_names_the_flag(capsys):
    assert parse_config(["--port", "8000"], {"SC2_PORT": "abc"}).port == 8000
    line = error_line(capsys, ["--context", "100"], {"SC2_CONTEXT": "8192"})
    assert line.startswith("--context must be") and "SC2_CONTEXT" not in line


def test_a_port_out_of_range_stops_the_app_with_one_line_and_no_traceback():
    result = subprocess.run(
        [sys.executable, "app.py", "--port", "99999"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "app.py: error: --port must be between 1 and 65535 (got 99999)"
    )
