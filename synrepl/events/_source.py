"""What the client needs from anything that can turn event IDs into full events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from synrepl.events._model import FullEvent

__all__ = ("EventSource",)


@runtime_checkable
class EventSource(Protocol):
    """A blocking, synchronous source of full events.

    The client calls it from a worker thread, one call at a time, never from
    the event loop: so it may block (within its timeouts), must hold no
    event-loop objects, and need only be safe for one caller at a time.

    Errors: :class:`~synrepl.events.EventSourceUnavailable` when the source
    is down or refuses (the client waits and retries); any other exception
    is a bug.
    """

    def fetch(self, event_ids: Sequence[str]) -> dict[str, FullEvent]:
        """The events of ``event_ids`` that the source has, by event ID.

        Batched: one query (or a few) for the whole batch, not one per event.
        Events the source does not have are absent from the answer; that is
        not an error.
        """
        ...

    def positions(self) -> dict[str, dict[str, int]]:
        """The ``events`` stream's persisted position per writer:
        ``{"events": {writer: token}}``, or ``{}`` if the source cannot tell.

        A read-only observer seeds its positions with this to start "from
        now" before any writer has spoken on replication.
        """
        ...

    def close(self) -> None:
        """Let go of connections; the source is not used afterwards."""
        ...
