"""Who runs on the GPU next: a fixed number of replies run, the rest wait.

Chat, `/generate` and the OpenAI routes all enter here, so they share the engine's batch and one
queue. A free place goes to the waiting reply whose client has the fewest replies running, the
oldest first among equals: a client may fill places nobody else wants, but a newcomer is served
ahead of its extra replies. A client may hold only a share of the waiting places, and a waiting
reply whose client has gone is dropped at once.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator

from starcoder2.errors import NoListener, QueueFull

# How often a waiting reply checks that its client still listens (and tells it its place).
POLL_S = 1.0


def per_client_places(max_waiting: int) -> int:
    """Waiting places one client may hold: a quarter of the queue, at least one."""
    return max(1, max_waiting // 4)


class Ticket:
    """One reply's place: waiting, then running until released (use it as a context manager)."""

    def __init__(
        self,
        admission: Admission,
        client: str | None,
        listening: Callable[[], bool],
        number: int = 0,
    ) -> None:
        self._admission = admission
        self.client = client
        self.number = number  # arrival order
        self.listening = listening
        self.running = False
        self.released = False

    def wait(self, poll_s: float = POLL_S) -> Iterator[int]:
        """Yield how many replies are ahead while waiting (at least every poll_s); end on admission.

        Raises NoListener when the client stops listening while it waits, or has stopped by the
        time its turn comes.
        """
        cond = self._admission.changed
        while True:
            with cond:
                running = self.running
                ahead = self._admission.ahead_of(self)
            if not self.listening():  # also when its turn has just come: no prefill for nobody
                self.release()
                raise NoListener("The reply's client stopped listening while it waited.")
            if running:
                return
            yield ahead
            with cond:
                if not self.running:
                    cond.wait(poll_s)

    def release(self) -> None:
        """Leave the queue, or free the running place; idempotent."""
        self._admission.release(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


class Admission:
    """At most `slots` replies run; up to `max_waiting` wait, each client holding a few places."""

    def __init__(self, slots: int, max_waiting: int) -> None:
        self.slots = max(1, slots)
        self.max_waiting = max_waiting
        self.per_client = per_client_places(max_waiting)
        self.changed = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._waiting_by_client: Counter[str] = Counter()
        self._running_by_client: Counter[str | None] = Counter()
        self._arrivals = 0  # numbers the tickets, oldest first
        self.running = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def set_slots(self, slots: int) -> None:
        """Let `slots` replies run at once (the engine's batch size, once a model is loaded)."""
        with self.changed:
            self.slots = max(1, slots)
            self._promote()

    def enter(self, client: str | None, listening: Callable[[], bool] = lambda: True) -> Ticket:
        """A ticket that runs at once if a place is free, else waits; QueueFull if none is left."""
        with self.changed:
            self._arrivals += 1
            ticket = Ticket(self, client, listening, self._arrivals)
            if self.running >= self.slots or self._waiting:
                if len(self._waiting) >= self.max_waiting:
                    raise QueueFull(
                        f"The queue is full: {len(self._waiting):,} replies are waiting for the "
                        f"GPU and {self.running:,} are being written; try again in a minute."
                    )
                if client is not None and self._waiting_by_client[client] >= self.per_client:
                    replies = "reply" if self.per_client == 1 else "replies"
                    raise QueueFull(
                        f"You already have {self.per_client:,} {replies} waiting for the GPU "
                        "(the limit per client); wait for one to start, then send again."
                    )
            self._waiting.append(ticket)
            if client is not None:
                self._waiting_by_client[client] += 1
            self._promote()
        return ticket

    def ahead_of(self, ticket: Ticket) -> int:
        """Replies waiting that would start before this one as things stand (holding `changed`)."""
        if ticket not in self._waiting:
            return 0
        mine = self._turn(ticket)
        return sum(1 for other in self._waiting if self._turn(other) < mine)

    def _turn(self, ticket: Ticket) -> tuple[int, int]:
        """Who goes first: fewer replies of its client running, then the older ticket."""
        return self._running_by_client[ticket.client], ticket.number

    def release(self, ticket: Ticket) -> None:
        with self.changed:
            if ticket.released:
                return
            ticket.released = True
            if ticket.running:
                self.running -= 1
                self._running_by_client[ticket.client] -= 1
                if not self._running_by_client[ticket.client]:
                    del self._running_by_client[ticket.client]
            else:
                self._leave_queue(ticket)
            self._promote()

    def _leave_queue(self, ticket: Ticket) -> None:
        try:
            self._waiting.remove(ticket)
        except ValueError:
            return
        if ticket.client is not None:
            self._waiting_by_client[ticket.client] -= 1
            if not self._waiting_by_client[ticket.client]:
                del self._waiting_by_client[ticket.client]

    def _promote(self) -> None:
        """Start waiting tickets, fairly (`_turn`), while places are free (holding `changed`)."""
        while self._waiting and self.running < self.slots:
            ticket = min(self._waiting, key=self._turn)
            self._leave_queue(ticket)
            ticket.running = True
            self.running += 1
            self._running_by_client[ticket.client] += 1
        self.changed.notify_all()
