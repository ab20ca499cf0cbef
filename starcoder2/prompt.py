"""StarCoder2-Instruct prompt format, stop conditions and context-budget trimming.

The text equals, character for character, what the chat template of
bigcode/starcoder2-15b-instruct-v0.1 renders (BOS and EOS are both <|endoftext|>):

    <|endoftext|>{SYSTEM_PREAMBLE}
    ### Instruction\n{user}\n\n
    ### Response\n{assistant}<|endoftext|>\n\n
    ... ### Instruction\n{current user}\n\n
    ### Response\n{response_prefix}

(one line per piece here; the prompt has no other newlines). That template rejects system
messages, so a system text is folded into the first kept instruction as
``{system}\n\n{first instruction}``; when old turns are dropped it moves to the new first one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from starcoder2.errors import ContextTooLong, InvalidMessages

BOS = "<|endoftext|>"
EOS = "<|endoftext|>"
SYSTEM_PREAMBLE = (
    "You are an exceptionally intelligent coding assistant that consistently delivers "
    "accurate and reliable responses to user instructions.\n\n"
)
INSTRUCTION_HEADER = "### Instruction\n"
RESPONSE_HEADER = "### Response\n"
EOS_TOKEN_ID = 0
# The model sometimes writes the next instruction itself instead of stopping with EOS.
STOP_STRINGS: tuple[str, ...] = ("\n### Instruction",)

ROLES = ("user", "assistant")
# StarCoder2's fill-in-the-middle tokens: prefix, then suffix, then the model writes the middle.
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"


def fim_prompt(prefix: str, suffix: str) -> str:
    """The text of a fill-in-the-middle prompt (raw model text: its tokens count as such)."""
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text; only trusted (template) text may encode to special tokens."""

    text: str
    trusted: bool


@dataclass(frozen=True)
class FittedPrompt:
    """The prompt that fits the context, its token ids, and how many old turns were dropped."""

    messages: list[dict[str, str]]
    segments: list[Segment]
    ids: list[int]
    dropped_turns: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


def _checked_messages(messages: object) -> list[dict[str, str]]:
    """Return the messages as plain role/content dicts, or raise InvalidMessages."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidMessages(
            "Messages must be a list of {'role', 'content'} dicts "
            f"(got {type(messages).__name__})."
        )
    if not messages:
        raise InvalidMessages("There are no messages; send an instruction first.")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise InvalidMessages(
                f"Message {index + 1} must be a dict with 'role' and 'content' (got {message!r})."
            )
        role, content = message["role"], message["content"]
        if role == "system":
            raise InvalidMessages(
                f"Message {index + 1} is a system message, which this model's template does not "
                "allow; pass the system text separately so it is folded into the first instruction."
            )
        expected = ROLES[index % 2]
        if role != expected:
            raise InvalidMessages(
                f"Message {index + 1} has role {role!r} but {expected!r} was expected; "
                "roles must alternate user, assistant, user, … starting with user."
            )
        if not isinstance(content, str):
            raise InvalidMessages(
                f"Message {index + 1} content must be text (got {type(content).__name__})."
            )
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "user":
        raise InvalidMessages(
            f"The last message must be the user's instruction (got {len(checked)} messages "
            "ending with an assistant reply)."
        )
    return checked


def _check_text(name: str, value: object) -> None:
    """Raise InvalidMessages unless value is a str."""
    if not isinstance(value, str):
        raise InvalidMessages(f"{name} must be text (got {type(value).__name__}).")


def _checked_inputs(
    messages: object, system: str | None, response_prefix: str
) -> list[dict[str, str]]:
    """The checked messages, once the system text and response prefix are checked too."""
    checked = _checked_messages(messages)
    if system is not None:
        _check_text("The system prompt", system)
    _check_text("The response prefix", response_prefix)
    return checked


def _segments(
    messages: list[dict[str, str]], system: str | None, response_prefix: str
) -> list[Segment]:
    """Render already-checked messages; adjacent segments of equal trust are merged."""
    pieces: list[Segment] = [Segment(BOS + SYSTEM_PREAMBLE, trusted=True)]
    for index, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "user":
            if index == 0 and system:
                content = f"{system}\n\n{content}"
            pieces += [
                Segment(INSTRUCTION_HEADER, True),
                Segment(content, False),
                Segment("\n\n", True),
            ]
        else:
            pieces += [
                Segment(RESPONSE_HEADER, True),
                Segment(content, False),
                Segment(EOS + "\n\n", True),
            ]
    pieces += [Segment(RESPONSE_HEADER, True), Segment(response_prefix, False)]

    merged: list[Segment] = []
    for piece in pieces:
        if not piece.text:
            continue
        if merged and merged[-1].trusted == piece.trusted:
            merged[-1] = Segment(merged[-1].text + piece.text, piece.trusted)
        else:
            merged.append(piece)
    return merged


def prompt_segments(
    messages: Sequence[Mapping[str, str]],
    *,
    system: str | None = None,
    response_prefix: str = "",
) -> list[Segment]:
    """Render a conversation as template (trusted) and content (untrusted) segments."""
    return _segments(_checked_inputs(messages, system, response_prefix), system, response_prefix)


def build_prompt(
    messages: Sequence[Mapping[str, str]],
    *,
    system: str | None = None,
    response_prefix: str = "",
) -> str:
    """Render a conversation as the exact prompt string the model was trained on."""
    segments = prompt_segments(messages, system=system, response_prefix=response_prefix)
    return "".join(segment.text for segment in segments)


def _check_count(name: str, value: object) -> int:
    """Return value if it is a positive int, else raise InvalidMessages."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidMessages(f"{name} must be a positive whole number (got {value!r}).")
    return value


def check_fits(
    prompt_tokens: int,
    max_new_tokens: int,
    context_tokens: int,
    *,
    text: str = "the message",
    limit: str = "max new tokens",
) -> None:
    """ContextTooLong unless the prompt and the longest reply fit into the context together;
    the message names what the user can shorten (`text`) and lower (`limit`) in their words."""
    if prompt_tokens + max_new_tokens > context_tokens:
        raise ContextTooLong(
            f"The prompt is {prompt_tokens:,} tokens and {limit} is {max_new_tokens:,}, but the "
            f"context is {context_tokens:,} tokens; shorten {text}, lower {limit} or raise the "
            "context size."
        )


def fit_to_context(
    messages: Sequence[Mapping[str, str]],
    *,
    encode: Callable[[Sequence[Segment]], list[int]],
    context_tokens: int,
    max_new_tokens: int,
    system: str | None = None,
    response_prefix: str = "",
) -> FittedPrompt:
    """Drop the oldest whole turns until prompt plus max_new_tokens fits into the context."""
    checked = _checked_inputs(messages, system, response_prefix)
    context_tokens = _check_count("The context size", context_tokens)
    max_new_tokens = _check_count("Max new tokens", max_new_tokens)

    budget = context_tokens - max_new_tokens
    total_turns = (len(checked) - 1) // 2
    encoded: dict[int, tuple[list[Segment], list[int]]] = {}

    def render(dropped: int) -> tuple[list[Segment], list[int]]:
        """Render and encode the prompt without the `dropped` oldest turns (memoised)."""
        if dropped not in encoded:
            segments = _segments(checked[2 * dropped :], system, response_prefix)
            encoded[dropped] = (segments, list(encode(segments)))
        return encoded[dropped]

    def result(dropped: int) -> FittedPrompt:
        segments, ids = render(dropped)
        return FittedPrompt(checked[2 * dropped :], segments, ids, dropped)

    if len(render(0)[1]) <= budget:
        return result(0)
    check_fits(len(render(total_turns)[1]), max_new_tokens, context_tokens)
    # Dropping turns only shortens the prompt, so binary search keeps the encodings logarithmic.
    too_long, fits = 0, total_turns
    while fits - too_long > 1:
        middle = (too_long + fits) // 2
        if len(render(middle)[1]) <= budget:
            fits = middle
        else:
            too_long = middle
    return result(fits)
