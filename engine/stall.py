"""Which watched things have stopped moving: the one definition of a stall.

The engine process watches each reply (its cache position), the web process watches each engine
process (its progress count). A thing is stuck once its marker has not changed for the timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable
from typing import Generic, TypeVar

DEFAULT_STALL_TIMEOUT_S = 10.0  # far above any legitimate step or prefill chunk, even on a T4

Key = TypeVar("Key", bound=Hashable)


class ProgressClock(Generic[Key]):
    """When each watched key's marker last changed; the keys that have not moved in `timeout_s`."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._seen: dict[Key, tuple[object, float]] = {}

    def saw(self, key: Key, marker: object) -> None:
        """The key's marker now: a new key, or a changed marker, starts its clock again."""
        last = self._seen.get(key)
        if last is None or last[0] != marker:
            self._seen[key] = (marker, self._clock())

    def forget(self, key: Key) -> None:
        self._seen.pop(key, None)

    def retain(self, keys: Collection[Key]) -> None:
        """Stop watching every key but these."""
        for key in [key for key in self._seen if key not in keys]:
            del self._seen[key]

    def still_for(self, key: Key) -> float:
        """Seconds since the key last moved (0 for a key not watched)."""
        last = self._seen.get(key)
        return 0.0 if last is None else self._clock() - last[1]

    def stuck(self) -> list[Key]:
        """The keys that have not moved for the timeout, oldest first."""
        now = self._clock()
        late = [
            (since, key) for key, (_, since) in self._seen.items() if now - since >= self.timeout_s
        ]
        return [key for _, key in sorted(late, key=lambda pair: pair[0])]
