"""`/generate`: one instruction in, the answer streamed out (Gradio's API, for gradio_client)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from engine.api import Finished
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
            with self.gate.enter() as ticket:
                for _ahead in ticket.wait():
                    pass  # the stream says nothing while it waits; Gradio reports the wait
                text = ""
                with contextlib.closing(self.gate.stream(request)) as events:
                    for event in events:
                        if isinstance(event, Finished):
                            if event.text != text:
                                yield event.text
                        else:
                            text += event.text
                            yield text
        except GeneratorExit:  # a cancel, a closed stream
            self.gate.metrics.request("generate", 499)
            raise
        except Exception as error:
            self.gate.metrics.request("generate", http_status(error))
            raise user_error(error) from None
        self.gate.metrics.request("generate", 200)
