"""Rows of the ``events`` and ``backfill`` streams.

On the wire an ``events`` row is ``[kind, [fields...]]``; the kind says which
of the three row types below the fields belong to.  synrepl hands users the
inner row directly; its ``TYPE_ID`` says the kind.
"""

from __future__ import annotations

from synrepl.streams._row import Row, stream_row

__all__ = ("EventRow", "CurrentStateRow", "AllStateRow", "BackfillRow")


@stream_row("events", "ev")
class EventRow(Row):
    """An event was persisted (or stopped being an outlier)."""

    __slots__ = ()

    event_id: str
    room_id: str
    type: str
    state_key: str | None
    redacts: str | None
    relates_to: str | None
    membership: str | None
    rejected: bool
    outlier: bool


@stream_row("events", "state")
class CurrentStateRow(Row):
    """One entry of a room's current state changed; ``event_id`` None = removed."""

    __slots__ = ()

    room_id: str
    type: str
    state_key: str
    event_id: str | None


@stream_row("events", "state-all")
class AllStateRow(Row):
    """A room's whole current state changed at once (too many rows to list)."""

    __slots__ = ()

    room_id: str


@stream_row("backfill")
class BackfillRow(Row):
    """An event fetched from history over federation (tokens count upwards)."""

    __slots__ = ()

    event_id: str
    room_id: str
    type: str
    state_key: str | None
    redacts: str | None
    relates_to: str | None
