"""A prompt as the web side would send it to any EngineClient: encoded, wrapped in a request."""

from __future__ import annotations

from collections.abc import Sequence

from engine.api import EngineClient, EventStream, GenerationRequest
from starcoder2.prompt import STOP_STRINGS, Segment
from starcoder2.settings import SamplingSettings


def ask(
    engine: EngineClient,
    prompt: Sequence[Segment] | Sequence[int],
    settings: SamplingSettings,
    stop: Sequence[str] = STOP_STRINGS,
) -> EventStream:
    """Stream the reply to `prompt` (segments, encoded by the engine's tokenizer, or ids)."""
    segments = tuple(part for part in prompt if isinstance(part, Segment))
    ids = tuple(engine.encode(segments)) if segments else tuple(int(i) for i in prompt)
    return engine.stream(GenerationRequest(ids, settings, segments, stop=tuple(stop)))
