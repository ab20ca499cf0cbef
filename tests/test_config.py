"""Configuration: flags win over environment variables, which win over defaults."""

import pytest

from web.config import parse_config


def test_max_jobs_defaults_to_eight_and_reads_flag_then_environment():
    assert parse_config([], {}).max_jobs == 8
    assert parse_config([], {"SC2_MAX_JOBS": "4"}).max_jobs == 4
    assert parse_config(["--max-jobs", "16"], {"SC2_MAX_JOBS": "4"}).max_jobs == 16


@pytest.mark.parametrize("value", ["0", "65", "-1"])
def test_max_jobs_outside_1_to_64_is_refused_with_the_range(value, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--max-jobs", value], {})
    assert "--max-jobs must be between 1 and 64" in capsys.readouterr().err
