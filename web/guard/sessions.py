"""Gradio keeps a message queue and a set of event ids per session and never drops finished ones.

So memory grew with every client served (a gradio_client, each `/call` request, every tab). A
sweep forgets sessions whose events are all over, with no stream open, for two sweeps in a row:
a client that reads its stream a little late still finds its messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import gradio as gr

SWEEP_EVERY_S = 30.0


class SessionSweeper:
    """Forgets finished sessions from Gradio's queue tables (call `sweep` on the event loop)."""

    def __init__(self, demo: gr.Blocks, is_streaming: Callable[[list[str]], bool]) -> None:
        self.demo = demo
        self.is_streaming = is_streaming
        self._finished_last_time: set[str] = set()

    def sweep(self) -> int:
        """Forget sessions finished now and at the last sweep; return how many were forgotten."""
        queue = self.demo._queue
        live = queue.event_ids_to_events
        finished = {
            session
            for session, ids in list(queue.pending_event_ids_session.items())
            if not any(event_id in live for event_id in ids)
            and not self.is_streaming([session, *ids])
        }
        gone = finished & self._finished_last_time
        for session in gone:
            queue.pending_event_ids_session.pop(session, None)
            queue.pending_messages_per_session.pop(session, None)
        self._finished_last_time = finished - gone
        return len(gone)

    def start(self) -> None:
        """Run the sweep every SWEEP_EVERY_S seconds once the app has started."""
        tasks: list[asyncio.Task] = []

        async def sweeping() -> None:
            while True:
                await asyncio.sleep(SWEEP_EVERY_S)
                async with self.demo._queue.pending_message_lock:
                    self.sweep()

        async def start() -> None:
            tasks.append(asyncio.get_running_loop().create_task(sweeping()))

        self.demo.extra_startup_events.append(start)
