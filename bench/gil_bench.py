"""The app's first-text latency when a Python-bound thread shares the interpreter (CPU, no GPU).

Usage: python bench/gil_bench.py [--switch-ms 5 0.5]
The real engine's worker thread runs exllamav2's step loop in Python almost without pause; this
mimics it with a thread spinning in Python beside the app (fake engine), and times the first text of
4 HTTP clients (3 rounds, clients in their own process), with and without the spinning thread, for
each interpreter switch interval.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def first_text_ms(url: str, rounds: int = 3, clients: int = 4) -> list[float]:
    times = []
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.app_bench import clients_main"
    )
    for _ in range(rounds):
        done = subprocess.run(
            [sys.executable, "-c", f"{code}; clients_main({url!r}, {clients})"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        line = [row for row in done.stdout.splitlines() if row.startswith("RESULT ")][-1]
        times += [1000 * r["ttft_s"] for r in json.loads(line[7:])]
    return sorted(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch-ms", type=float, nargs="+", default=[5.0, 0.5])
    args = parser.parse_args()

    from tests.fakes.fake_engine import FakeEngine
    from web.config import AppConfig
    from web.server import build_app

    web = build_app(FakeEngine(["tok "] * 64, chunk_delay_s=0.005), AppConfig(rate_limit=0))
    options = {**web.launch_options(), "server_name": "127.0.0.1", "server_port": None}
    _, url, _ = web.demo.launch(**options, prevent_thread_lock=True, quiet=True)
    demo = web.demo
    first_text_ms(url, rounds=1)  # warm-up: the first request pays one-off costs
    stop = threading.Event()

    def spin():
        total = 0
        while not stop.is_set():
            for i in range(1000):
                total += i * i

    try:
        print("| switch interval | spinning thread | first text p50 | p90 |")
        print("|---|---|---|---|")
        for switch_ms in args.switch_ms:
            sys.setswitchinterval(switch_ms / 1000)
            for spinning in (False, True):
                stop.clear()
                worker = threading.Thread(target=spin, daemon=True)
                if spinning:
                    worker.start()
                times = first_text_ms(url)
                stop.set()
                p50, p90 = times[len(times) // 2], times[int(len(times) * 0.9)]
                label = "yes" if spinning else "no"
                print(f"| {switch_ms:g} ms | {label} | {p50:.0f} ms | {p90:.0f} ms |")
    finally:
        demo.close()


if __name__ == "__main__":
    main()
