"""`GET /metrics` in Prometheus' text format: requests, tokens, latencies, queue and cache."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from engine.api import Finished

PREFIX = "sc2"
TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TOKEN_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Histogram:
    """Counts of observations at or under each bound, their sum and their number."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str, text: str) -> list[str]:
        out = [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            label = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{le="{label}"}} {running}')
        out += [f"{name}_sum {self.total:.6f}", f"{name}_count {running}"]
        return out


class Metrics:
    """What the server counts; gauges and the engine's counters are read when /metrics is asked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cached_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.per_token = Histogram(TOKEN_BUCKETS_S)
        self.readings: dict[
            str, tuple[str, str, Callable[[], float]]
        ] = {}  # name: kind, help, read

    def request(self, endpoint: str, status: int | str) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def finished(self, event: Finished) -> None:
        with self._lock:
            self.prompt_tokens += event.prompt_tokens
            self.generated_tokens += event.new_tokens
            self.cached_tokens += event.cached_tokens
            self.ttft.observe(event.time_to_first_token_s)
            if event.decode_tokens_per_s > 0:
                self.per_token.observe(1.0 / event.decode_tokens_per_s)

    def gauge(self, name: str, text: str, read: Callable[[], float]) -> None:
        self.readings[name] = ("gauge", text, read)

    def counter(self, name: str, text: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere (the engine's), read when /metrics is asked."""
        self.readings[name] = ("counter", text, read)

    def text(self) -> str:
        with self._lock:
            lines = [
                f"# HELP {PREFIX}_requests_total Requests by endpoint and HTTP-style status.",
                f"# TYPE {PREFIX}_requests_total counter",
            ]
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(
                    f'{PREFIX}_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
                )
            for name, value, text in (
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished replies."),
                ("cached_prompt_tokens_total", self.cached_tokens, "Of them, from the cache."),
                ("generated_tokens_total", self.generated_tokens, "Tokens written."),
            ):
                lines += [
                    f"# HELP {PREFIX}_{name} {text}",
                    f"# TYPE {PREFIX}_{name} counter",
                    f"{PREFIX}_{name} {value}",
                ]
            lines += self.ttft.lines(
                f"{PREFIX}_time_to_first_token_seconds", "Time to first token."
            )
            lines += self.per_token.lines(
                f"{PREFIX}_time_per_output_token_seconds", "Mean time between tokens, per reply."
            )
        for name, (kind, text, read) in self.readings.items():
            lines += [f"# HELP {PREFIX}_{name} {text}", f"# TYPE {PREFIX}_{name} {kind}"]
            lines.append(f"{PREFIX}_{name} {read():g}")
        return "\n".join(lines) + "\n"


def metrics_route(metrics: Metrics, refusal: Callable[[Request], Any]) -> Route:
    """GET /metrics (behind the API key when one is set; `refusal` says why not, or None)."""

    def serve(request: Request) -> PlainTextResponse:
        refused = refusal(request)
        if refused is not None:
            return PlainTextResponse(refused.message + "\n", refused.status, refused.headers)
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    return Route("/metrics", serve, methods=["GET"])
