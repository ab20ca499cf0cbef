"""What Gradio keeps per session, bounded.

- Gradio keeps a message queue and a set of event ids per session and never drops finished ones,
  so memory grew with every client served (a gradio_client, each `/call` request, every tab). A
  sweep forgets sessions whose events are all over, with no stream open, for two sweeps in a row:
  a client that reads its stream a little late still finds its messages.
- Gradio also keeps, per session, a copy of every value the session's events carried in or out,
  used only to write deep links (which this app refuses): a 14 MB chat history sent once stayed
  for as long as the session did, in each of hundreds of sessions. `LeanSessions` keeps none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import gradio as gr
from gradio.state_holder import SessionState, StateHolder

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


class _LeanSession(SessionState):
    """A session that keeps its gr.State values and the components' settings, not their values."""

    def _update_value_in_config(self, key: int, value: Any) -> None:
        pass


class LeanSessions(StateHolder):
    """Gradio's table of sessions, holding _LeanSession ones."""

    def __getitem__(self, session_id: str) -> SessionState:
        if session_id not in self.session_data:
            self.session_data[session_id] = _LeanSession(self.blocks)
        return super().__getitem__(session_id)

    @classmethod
    def install(cls, demo: gr.Blocks) -> None:
        """Serve `demo`'s sessions from a LeanSessions table once the app has started."""

        async def start() -> None:
            sessions = cls()
            sessions.set_blocks(demo)  # demo.state_holder, with the capacity launch() was given
            demo.server_app.state_holder = sessions

        demo.extra_startup_events.append(start)
