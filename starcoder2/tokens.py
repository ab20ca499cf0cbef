"""Prompt text to token ids with the model's own tokenizer (no torch): the edge encodes once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from starcoder2.prompt import Segment


class PromptEncoder:
    """Encodes prompt segments: template text may hold special tokens, user text never does."""

    def __init__(self, tokenizer_json: str | Path) -> None:
        from tokenizers import Tokenizer

        self._trusted = Tokenizer.from_file(str(tokenizer_json))
        self._literal = Tokenizer.from_file(str(tokenizer_json))
        self._literal.encode_special_tokens = True  # typing "<|endoftext|>" gives plain-text tokens

    @classmethod
    def for_model(cls, model_dir: str | Path) -> PromptEncoder:
        return cls(Path(model_dir) / "tokenizer.json")

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        ids: list[int] = []
        for segment in segments:
            tokenizer = self._trusted if segment.trusted else self._literal
            # encode_batch lets go of the interpreter while it works (encode holds it: 400,000
            # characters would stop every other request for a fraction of a second).
            (encoding,) = tokenizer.encode_batch([segment.text], add_special_tokens=False)
            ids += encoding.ids
        return ids
