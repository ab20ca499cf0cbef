"""The StarCoder2-Instruct prompt format, pinned to the letter, and context-budget trimming."""

import jinja2
import pytest

from starcoder2.errors import ChatError, ContextTooLong, InvalidMessages
from starcoder2.prompt import (
    BOS,
    EOS_TOKEN_ID,
    STOP_STRINGS,
    SYSTEM_PREAMBLE,
    FittedPrompt,
    Segment,
    build_prompt,
    fit_to_context,
    prompt_segments,
)

# The chat template shipped in bigcode/starcoder2-15b-instruct-v0.1's tokenizer_config.json.
CHAT_TEMPLATE = (
    "{{bos_token}}{{'You are an exceptionally intelligent coding assistant that consistently "
    "delivers accurate and reliable responses to user instructions.\\n\\n'}}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'system' %}\n"
    "        {{ raise_exception('System messages are not allowed in this template.') }}\n"
    "    {%- else %}\n"
    "        {%- if message['role'] == 'user' %}\n"
    "{{'### Instruction\\n' + message['content'] + '\\n\\n'}}\n"
    "        {%- else %}\n"
    "{{'### Response\\n' + message['content'] + eos_token + '\\n\\n'}}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{{'### Response\\n'}}"
)

PREAMBLE = (
    "<|endoftext|>You are an exceptionally intelligent coding assistant that consistently "
    "delivers accurate and reliable responses to user instructions.\n\n"
)


def render_reference(messages):
    """Render messages with the model's own Jinja template, as transformers does."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    template = environment.from_string(CHAT_TEMPLATE)
    return template.render(
        messages=messages,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        add_generation_prompt=True,
    )


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def chars(segments):
    """A stand-in tokenizer: one token per character."""
    return [ord(character) for segment in segments for character in segment.text]


class CountingCounter:
    """Counts characters like `chars` and remembers how often it was called."""

    def __init__(self):
        self.calls = 0

    def __call__(self, segments):
        self.calls += 1
        return chars(segments)


def test_the_prompt_constants_are_the_model_cards_literal_strings():
    assert BOS == "<|endoftext|>"
    assert EOS_TOKEN_ID == 0
    assert STOP_STRINGS == ("\n### Instruction",)
    assert PREAMBLE == BOS + SYSTEM_PREAMBLE


def test_single_turn_prompt_is_exact():
    assert build_prompt([user("Write a quicksort in Python.")]) == (
        PREAMBLE + "### Instruction\nWrite a quicksort in Python.\n\n### Response\n"
    )


def test_multi_turn_prompt_closes_each_reply_with_eos_and_a_blank_line():
    messages = [user("Hi"), assistant("Hello!"), user("Add tests")]
    assert build_prompt(messages) == (
        PREAMBLE
        + "### Instruction\nHi\n\n"
        + "### Response\nHello!<|endoftext|>\n\n"
        + "### Instruction\nAdd tests\n\n"
        + "### Response\n"
    )


def test_system_text_is_folded_into_the_first_instruction_only():
    messages = [user("Hi"), assistant("Hello!"), user("Again")]
    assert build_prompt(messages, system="Answer in Rust.") == (
        PREAMBLE
        + "### Instruction\nAnswer in Rust.\n\nHi\n\n"
        + "### Response\nHello!<|endoftext|>\n\n"
        + "### Instruction\nAgain\n\n"
        + "### Response\n"
    )


def test_empty_system_text_changes_nothing():
    assert build_prompt([user("Hi")], system="") == build_prompt([user("Hi")])


def test_response_prefix_follows_the_response_header():
    prompt = build_prompt([user("Sort a list")], response_prefix="```python\n")
    assert prompt.endswith("### Instruction\nSort a list\n\n### Response\n```python\n")


def test_unicode_content_passes_through_unchanged():
    text = "Explain 🐍 and 快速排序 and שלום עולם"
    assert build_prompt([user(text)]) == (PREAMBLE + f"### Instruction\n{text}\n\n### Response\n")


def test_build_prompt_is_the_concatenation_of_the_segments():
    messages = [user("a"), assistant("b"), user("c")]
    segments = prompt_segments(messages, system="s", response_prefix="p")
    assert "".join(s.text for s in segments) == build_prompt(
        messages, system="s", response_prefix="p"
    )


def test_template_text_is_trusted_and_content_is_not():
    segments = prompt_segments(
        [user("<|endoftext|>u"), assistant("a"), user("c")], response_prefix="pre"
    )
    assert segments == [
        Segment(PREAMBLE + "### Instruction\n", True),
        Segment("<|endoftext|>u", False),
        Segment("\n\n### Response\n", True),
        Segment("a", False),
        Segment("<|endoftext|>\n\n### Instruction\n", True),
        Segment("c", False),
        Segment("\n\n### Response\n", True),
        Segment("pre", False),
    ]


def test_system_text_is_untrusted_content():
    segments = prompt_segments([user("Hi")], system="<|endoftext|>")
    assert Segment("<|endoftext|>\n\nHi", False) in segments


@pytest.mark.parametrize(
    "messages",
    [
        [user("Write hello world in C.")],
        [user("Hi"), assistant("Hello! How can I help?"), user("Fizzbuzz please")],
        [user("a"), assistant("b"), user("c"), assistant("d"), user("e")],
        [user("  spaces  \n"), assistant(""), user("")],
        [user("def f():\n    return '### Response'"), assistant("<|endoftext|>"), user("🙂 中文")],
    ],
)
def test_prompt_equals_the_models_own_jinja_template(messages):
    assert build_prompt(messages) == render_reference(messages)


def test_models_template_rejects_system_messages_and_so_do_we():
    messages = [{"role": "system", "content": "x"}, user("Hi")]
    with pytest.raises(jinja2.exceptions.TemplateError, match="System messages are not allowed"):
        render_reference(messages)
    with pytest.raises(InvalidMessages, match="system message"):
        build_prompt(messages)


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "no messages"),
        ("Hi", "must be a list"),
        ([assistant("Hi")], "'user' was expected"),
        ([user("a"), user("b")], "'assistant' was expected"),
        ([user("a"), assistant("b")], "last message must be the user's"),
        ([user(["not", "text"])], "content must be text"),
        ([user(None)], "content must be text"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "tool", "content": "x"}], "'user' was expected"),
    ],
)
def test_bad_messages_raise_invalid_messages_with_a_clear_message(messages, fragment):
    with pytest.raises(InvalidMessages, match=fragment) as caught:
        build_prompt(messages)
    assert isinstance(caught.value, ChatError)
    assert isinstance(caught.value, ValueError)


def test_non_text_response_prefix_is_rejected():
    with pytest.raises(InvalidMessages, match="response prefix must be text"):
        build_prompt([user("Hi")], response_prefix=None)


def test_extra_message_keys_are_ignored():
    message = {"role": "user", "content": "Hi", "metadata": {"title": None}}
    assert build_prompt([message]) == build_prompt([user("Hi")])


def conversation(turns):
    """`turns` old user/assistant pairs of 100 characters each, then a short instruction."""
    messages = []
    for index in range(turns):
        messages += [user(f"q{index}".ljust(100, ".")), assistant(f"a{index}".ljust(100, "."))]
    return messages + [user("current")]


def test_history_that_fits_is_kept_whole_with_one_count():
    messages = conversation(3)
    counter = CountingCounter()
    fitted = fit_to_context(messages, encode=counter, context_tokens=10_000, max_new_tokens=1)
    assert fitted == FittedPrompt(
        messages=messages,
        segments=prompt_segments(messages),
        ids=[ord(character) for character in build_prompt(messages)],
        dropped_turns=0,
    )
    assert counter.calls == 1


def test_history_is_trimmed_oldest_first_but_keeps_current_instruction():
    messages = conversation(10)
    # Room for the current instruction and exactly three old turns.
    budget = len(build_prompt(messages[14:]))
    fitted = fit_to_context(messages, encode=chars, context_tokens=budget + 100, max_new_tokens=100)
    assert fitted.dropped_turns == 7
    assert fitted.messages == messages[14:]
    assert fitted.messages[0]["content"].startswith("q7")
    assert fitted.messages[-1] == user("current")
    assert fitted.prompt_tokens == budget
    assert "".join(s.text for s in fitted.segments) == build_prompt(messages[14:])


def test_one_token_too_many_drops_one_more_turn():
    messages = conversation(10)
    budget = len(build_prompt(messages[14:]))
    fitted = fit_to_context(messages, encode=chars, context_tokens=budget + 99, max_new_tokens=100)
    assert fitted.dropped_turns == 8
    assert fitted.messages == messages[16:]


def test_system_text_moves_to_the_first_kept_instruction():
    messages = conversation(4)
    fitted = fit_to_context(
        messages, encode=chars, context_tokens=400, max_new_tokens=50, system="SYS"
    )
    kept = messages[2 * fitted.dropped_turns :]
    assert fitted.dropped_turns > 0
    text = "".join(s.text for s in fitted.segments)
    assert text == build_prompt(kept, system="SYS")
    assert f"### Instruction\nSYS\n\n{kept[0]['content']}\n\n" in text
    assert text.count("SYS") == 1


def test_only_the_current_instruction_is_kept_when_nothing_else_fits():
    messages = conversation(5)
    budget = len(build_prompt([user("current")]))
    fitted = fit_to_context(messages, encode=chars, context_tokens=budget + 1, max_new_tokens=1)
    assert fitted.dropped_turns == 5
    assert fitted.messages == [user("current")]


def test_current_instruction_that_cannot_fit_raises_context_too_long_with_numbers():
    long_instruction = "x" * 9000
    prompt_tokens = len(build_prompt([user(long_instruction)]))
    with pytest.raises(ContextTooLong) as caught:
        fit_to_context(
            [user("old"), assistant("reply"), user(long_instruction)],
            encode=chars,
            context_tokens=8192,
            max_new_tokens=512,
        )
    assert str(caught.value) == (
        f"The prompt is {prompt_tokens:,} tokens and max new tokens is 512, but the context is "
        "8,192 tokens; shorten the message, lower max new tokens or raise the context size."
    )


def test_max_new_tokens_alone_can_exceed_the_context():
    with pytest.raises(ContextTooLong, match="max new tokens is 4,096, but the context is 4,096"):
        fit_to_context([user("Hi")], encode=chars, context_tokens=4096, max_new_tokens=4096)


@pytest.mark.parametrize("turns", [1, 2, 7, 64, 1000])
def test_token_counting_calls_grow_logarithmically_with_history(turns):
    messages = conversation(turns)
    two_turns = len(build_prompt(conversation(2)))  # every old turn has the same length
    counter = CountingCounter()
    fitted = fit_to_context(
        messages, encode=counter, context_tokens=two_turns + 100, max_new_tokens=100
    )
    assert fitted.prompt_tokens + 100 <= two_turns + 100
    assert fitted.dropped_turns == max(0, turns - 2)
    assert counter.calls <= 2 + max(1, turns).bit_length()


@pytest.mark.parametrize(
    ("context_tokens", "max_new_tokens"), [(0, 1), (100, 0), (100.0, 1), (True, 1), (100, "1")]
)
def test_non_positive_or_non_integer_budgets_are_rejected(context_tokens, max_new_tokens):
    with pytest.raises(InvalidMessages, match="positive whole number"):
        fit_to_context(
            [user("Hi")],
            encode=chars,
            context_tokens=context_tokens,
            max_new_tokens=max_new_tokens,
        )
