"""The branch catalogue, the VRAM estimate against the model card, and the branch picker."""

import pytest

from starcoder2.branches import (
    BRANCHES,
    CACHE_MODES,
    CONTEXT_STEP,
    DEFAULT_REPO,
    MAX_CONTEXT,
    MIN_CONTEXT,
    Branch,
    cache_bytes_per_token,
    check_load_settings,
    estimate_vram_gb,
    get_branch,
    pick_branch,
    validate_context,
    weight_bytes,
)
from starcoder2.errors import ChatError, InvalidSetting, UnknownBranch


def test_catalogue_lists_the_five_branches_smallest_first():
    assert DEFAULT_REPO == "bartowski/starcoder2-15b-instruct-v0.1-exl2"
    assert list(BRANCHES) == ["3_5", "4_25", "5_0", "6_5", "8_0"]
    assert BRANCHES["8_0"] == Branch("8_0", 8.0, 8, 15.8, 16.8, 18.1)
    assert BRANCHES["3_5"] == Branch("3_5", 3.5, 6, 8.1, 9.1, 10.4)
    assert [b.head_bits for b in BRANCHES.values()] == [6, 6, 6, 8, 8]


def test_branch_names_spell_their_bits():
    for name, branch in BRANCHES.items():
        assert branch.name == name
        assert float(name.replace("_", ".")) == branch.bits


def test_contexts_run_from_256_to_32768_in_steps_of_256_with_four_cache_modes():
    assert (MIN_CONTEXT, MAX_CONTEXT, CONTEXT_STEP) == (256, 32768, 256)
    assert CACHE_MODES == ("fp16", "q8", "q6", "q4")


def test_get_branch_returns_the_entry():
    assert get_branch("4_25").bits == 4.25


@pytest.mark.parametrize("name", ["4.25", "4_0", "", "auto", "8_0 "])
def test_unknown_branch_lists_the_valid_names(name):
    with pytest.raises(UnknownBranch) as caught:
        get_branch(name)
    message = str(caught.value)
    assert repr(name) in message
    assert "3_5, 4_25, 5_0, 6_5, 8_0" in message
    assert isinstance(caught.value, ChatError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("context", [256, 512, 4096, 16128, 16384, 16640, 32512, 32768])
def test_valid_context_sizes_are_returned(context):
    assert validate_context(context) == context


def test_whole_float_context_is_returned_as_int():
    value = validate_context(4096.0)
    assert value == 4096 and type(value) is int


@pytest.mark.parametrize("context", [0, 255, 300, 16385, 32769, 33024, 65536, -256])
def test_out_of_range_or_unaligned_context_is_rejected(context):
    with pytest.raises(InvalidSetting) as caught:
        validate_context(context)
    assert f"(got {context:,})" in str(caught.value)
    assert "a multiple of 256 between 256 and 32,768" in str(caught.value)


@pytest.mark.parametrize("context", [4096.5, "4096", None, True, float("nan")])
def test_non_integer_context_is_rejected(context):
    with pytest.raises(InvalidSetting, match="a multiple of 256"):
        validate_context(context)


def test_fp16_cache_costs_81920_bytes_per_token():
    # K and V x 40 layers x 4 KV heads x 128 dims x 2 bytes.
    assert cache_bytes_per_token("fp16") == 2 * 40 * 4 * 128 * 2 == 81920


def test_quantized_caches_add_an_fp16_scale_per_32_elements():
    elements = 2 * 40 * 4 * 128
    assert cache_bytes_per_token("q8") == elements * (1 + 2 / 32)
    assert cache_bytes_per_token("q6") == elements * (0.75 + 2 / 32)
    assert cache_bytes_per_token("q4") == elements * (0.5 + 2 / 32)


# The base model's card (bartowski/starcoder2-15b-exl2: the same shape, the same 8.0 bits with an
# 8-bit head) gives its 8_0 row as 16.6 / 17.5 / 18.8 GB.
BASE_CARD_8_0 = (16.6, 17.5, 18.8)


def card_row(name: str) -> tuple[float, float, float]:
    branch = BRANCHES[name]
    return branch.card_vram_gb_4k, branch.card_vram_gb_16k, branch.card_vram_gb_32k


@pytest.mark.parametrize("name", ["3_5", "4_25", "5_0", "6_5"])
def test_estimate_agrees_with_the_model_card_within_five_percent_at_4k_16k_and_32k(name):
    estimates = [estimate_vram_gb(name, context) for context in (4096, 16384, 32768)]
    assert estimates == pytest.approx(card_row(name), rel=0.05)


def test_the_cards_8_0_row_is_below_its_own_weights_so_8_0_is_held_to_the_base_models_card():
    # 8.0 bits of every decoder weight and the 8-bit head, with a 4k fp16 cache and nothing else,
    # already pass the instruct card's 15.8 GB: that row cannot be met by any estimate.
    assert (weight_bytes("8_0") + 4096 * cache_bytes_per_token("fp16")) / 1e9 > card_row("8_0")[0]
    estimates = [estimate_vram_gb("8_0", context) for context in (4096, 16384, 32768)]
    assert estimates == pytest.approx(BASE_CARD_8_0, rel=0.05)
    assert estimates == pytest.approx(card_row("8_0"), rel=0.07)


@pytest.mark.parametrize("name", list(BRANCHES))
def test_sixteen_thousand_more_tokens_cost_what_the_card_adds_from_16k_to_32k(name):
    growth = estimate_vram_gb(name, 32768) - estimate_vram_gb(name, 16384)
    assert growth == pytest.approx(16384 * 81920 / 1e9)
    card = card_row(name)
    assert growth == pytest.approx(card[2] - card[1], abs=0.05)


@pytest.mark.parametrize("name", list(BRANCHES))
def test_twelve_thousand_more_tokens_cost_about_one_gigabyte_as_on_the_card(name):
    growth = estimate_vram_gb(name, 16384) - estimate_vram_gb(name, 4096)
    assert growth == pytest.approx(12288 * 81920 / 1e9)
    assert growth == pytest.approx(1.0, abs=0.05)


def test_estimate_grows_with_bits_and_context_and_shrinks_with_cache_quantization():
    sizes = [estimate_vram_gb(name, 4096) for name in BRANCHES]
    assert sizes == sorted(sizes)
    assert estimate_vram_gb("5_0", 4096) < estimate_vram_gb("5_0", 8192)
    by_mode = [estimate_vram_gb("5_0", 16384, mode) for mode in CACHE_MODES]
    assert by_mode == sorted(by_mode, reverse=True)


def test_estimate_pins_the_computed_figures():
    table = {
        name: [round(estimate_vram_gb(name, ctx, mode), 2) for ctx in (4096, 16384)
               for mode in ("fp16", "q4")]
        for name in BRANCHES
    }  # fmt: skip
    assert table == {
        "3_5": [8.09, 7.85, 9.09, 8.16],
        "4_25": [9.52, 9.29, 10.53, 9.6],
        "5_0": [10.96, 10.73, 11.97, 11.04],
        "6_5": [13.92, 13.69, 14.92, 13.99],
        "8_0": [16.8, 16.56, 17.8, 16.87],
    }
    at_32k = {name: round(estimate_vram_gb(name, 32768), 2) for name in BRANCHES}
    assert at_32k == {"3_5": 10.43, "4_25": 11.87, "5_0": 13.31, "6_5": 16.27, "8_0": 19.15}


def test_estimate_rejects_unknown_branch_cache_mode_and_context():
    with pytest.raises(UnknownBranch):
        estimate_vram_gb("9_0", 4096)
    with pytest.raises(InvalidSetting, match="Unknown cache mode 'fp8'; choose one of fp16, q8"):
        estimate_vram_gb("4_25", 4096, "fp8")
    with pytest.raises(InvalidSetting, match="multiple of 256"):
        estimate_vram_gb("4_25", 4000)


@pytest.mark.parametrize(
    ("free_gb", "context", "cache_mode", "expected"),
    [
        (8, 4096, "fp16", None),
        (10, 4096, "fp16", "3_5"),
        (10, 4096, "q4", "4_25"),
        (12, 16384, "fp16", "4_25"),
        (12, 16384, "q4", "5_0"),
        (16, 4096, "fp16", "6_5"),
        (16, 4096, "q4", "6_5"),
        (24, 4096, "fp16", "8_0"),
        (24, 16384, "q4", "8_0"),
        (80, 4096, "fp16", "8_0"),
        (80, 16384, "fp16", "8_0"),
        (12, 32768, "fp16", "3_5"),
        (12, 32768, "q4", "4_25"),
        (16, 32768, "fp16", "5_0"),
        (20, 32768, "fp16", "6_5"),
        (24, 32768, "fp16", "8_0"),
    ],
)
def test_pick_branch_takes_the_largest_that_fits_with_margin(
    free_gb, context, cache_mode, expected
):
    assert pick_branch(free_gb, context, cache_mode) == expected


def test_pick_branch_keeps_half_a_gigabyte_of_headroom():
    need = estimate_vram_gb("3_5", 4096)
    assert pick_branch(need + 0.5, 4096) == "3_5"
    assert pick_branch(need + 0.49, 4096) is None


def test_pick_branch_keeps_five_percent_headroom_for_large_branches():
    need = estimate_vram_gb("8_0", 4096)
    assert need * 0.05 > 0.5
    assert pick_branch(need * 1.05 + 1e-6, 4096) == "8_0"
    assert pick_branch(need * 1.05 - 0.01, 4096) == "6_5"


@pytest.mark.parametrize("context", [255, 300, 33024, 0, -256])
def test_context_outside_256_to_32768_in_steps_of_256_is_refused(context):
    with pytest.raises(InvalidSetting, match="multiple of 256"):
        check_load_settings(context, "fp16")


def test_unknown_cache_mode_is_refused_with_the_valid_ones_listed():
    with pytest.raises(InvalidSetting, match="fp16, q8, q6, q4"):
        check_load_settings(4096, "fp8")
