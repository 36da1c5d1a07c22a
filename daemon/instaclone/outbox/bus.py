"""The event bus: who hears of committed events, in this process.

The store calls :meth:`EventBus.publish` (its commit hook) on the event loop
after each transaction that wrote events; the webhook sender, the event
stream and the metrics subscribe. Events are already durable when they are
published: a listener only reacts (wakes a sender, counts), it cannot lose one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..log import get as get_logger
from ..model import Event

#: Called on the event loop with each committed event; should not raise.
Listener = Callable[[Event], None]

log = get_logger(component="events")


class EventBus:
    """Fans committed events out to listeners; a failing listener is logged, the others still run."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        """Call ``fn(event)`` for each event published from now on; returns the unsubscribe call."""
        self._listeners.append(fn)

        def unsubscribe() -> None:
            if fn in self._listeners:
                self._listeners.remove(fn)

        return unsubscribe

    def publish(self, events: Sequence[Event]) -> None:
        """Hand ``events`` (committed, in cursor order) to every listener."""
        for ev in events:
            for fn in list(self._listeners):
                try:
                    fn(ev)
                except Exception:  # a listener's bug must not fail the change that was committed
                    log.exception("event.listener_failed", type=ev.type, cursor=ev.cursor)
