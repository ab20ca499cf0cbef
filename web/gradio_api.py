"""`/generate`: one instruction in, the answer streamed out (Gradio's API, for gradio_client)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from engine.api import Finished, TextDelta
from starcoder2.errors import InvalidMessages
from starcoder2.settings import FIELDS, validate_settings
from web.errors import http_status, user_error
from web.gate import GpuGate
from web.guard.limits import check_text

DEFAULTS = {spec.name: spec.default for spec in FIELDS}


class GenerateApi:
    """The handler behind `/generate`; its parameters are the API's, in order."""

    def __init__(self, gate: GpuGate) -> None:
        self.gate = gate

    def generate(
        self,
        prompt: str,
        temperature: float = DEFAULTS["temperature"],
        top_p: float = DEFAULTS["top_p"],
        top_k: int = int(DEFAULTS["top_k"]),
        min_p: float = DEFAULTS["min_p"],
        repetition_penalty: float = DEFAULTS["repetition_penalty"],
        max_new_tokens: int = int(DEFAULTS["max_new_tokens"]),
        seed: int | None = None,
    ) -> Iterator[str]:
        """Answer one instruction; each streamed value is the whole answer so far."""
        try:
            check_text("The prompt", prompt)
            settings = validate_settings(
                {
                    "temperature": temperature,
                    "top_p": top_p,
                    "top_k": top_k,
                    "min_p": min_p,
                    "repetition_penalty": repetition_penalty,
                    "max_new_tokens": max_new_tokens,
                    "seed": seed,
                }
            )
            if not prompt.strip():
                raise InvalidMessages("The prompt is empty; send an instruction to answer.")
            request = self.gate.fit([{"role": "user", "content": prompt}], settings)
            ticket = self.gate.enter()
        except Exception as error:  # refused before it had a place: counted here
            self.gate.metrics.request("generate", http_status(error))
            raise user_error(error) from None
        text = ""
        try:
            # The stream says nothing while it waits (Gradio reports the wait); a cancel or a
            # closed stream closes this generator, which closes the run and its job.
            with ticket, contextlib.closing(self.gate.run(request, ticket, "generate")) as events:
                for event in events:
                    if isinstance(event, Finished) and event.text != text:
                        yield event.text
                    elif isinstance(event, TextDelta):
                        text += event.text
                        yield text
        except Exception as error:  # the run counted it
            raise user_error(error) from None
