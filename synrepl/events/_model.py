"""The full event an observer receives, and the note left for one that could not be found.

Replication rows say that an event exists, not what it says: sender and
content live only in Synapse's database.  :class:`FullEvent` is that event as
a client would see it, frozen so that handlers can share it safely.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import attrs

__all__ = ("FullEvent", "MissingEvent", "FrozenDict", "freeze", "thaw")


class FrozenDict(dict[str, Any]):
    """A dict that refuses changes: event content is shared between handlers.

    It stays a ``dict`` so that ``json.dumps`` and ``==`` with plain dicts
    work unchanged.
    """

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("event content is read-only; copy it with synrepl.events.thaw()")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __hash__(self) -> int:  # type: ignore[override]
        raise TypeError("unhashable type: 'FrozenDict'")

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


_EMPTY = FrozenDict()


def freeze(value: Any) -> Any:
    """A read-only copy of decoded JSON: dicts become FrozenDict, lists tuples."""
    if isinstance(value, dict):
        return FrozenDict({str(k): freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, mutable copy (dicts and lists) of something :func:`freeze` made."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


def _fields(event: FullEvent | MissingEvent) -> dict[str, Any]:
    return {f.name: thaw(getattr(event, f.name)) for f in attrs.fields(type(event))}


def _frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return value if isinstance(value, FrozenDict) else freeze(dict(value))


@attrs.frozen(eq=True, hash=False)
class FullEvent:
    """One event as the room holds it, with what the server knows about it.

    Attributes:
        event_id: the event's ID.
        room_id: the room it belongs to.
        type: the event type (``m.room.message``, ...).
        sender: the user who sent it.
        state_key: the state key for a state event, None for anything else.
        content: the content as clients see it: for a redacted event only
            the keys the room version's redaction rules keep (see
            :attr:`redacted`).  Read-only; :func:`thaw` copies it.
        origin_server_ts: the sender's server's timestamp, in milliseconds.
        unsigned: the server's extra data kept with the event (``age_ts``,
            ``replaces_state``, ...); read-only.
        redacts: for an ``m.room.redaction``, the event it redacts (from the
            top level, or from the content from room version 11 on).
        room_version: the room's version (``"10"``, ...), None if the source
            cannot tell.
        rejected: the server rejected the event (failed authorisation); it is
            not part of the room's history.
        rejection_reason: why, when rejected.
        outlier: the server holds the event outside the room's timeline
            (an invite from elsewhere, an auth event fetched over federation).
        redacted: a valid redaction of the event exists (or it has been
            censored after ``redaction_retention_period``); its content has
            been reduced as the room version's redaction rules say.
        redacted_by: the redacting event, when known.
    """

    event_id: str
    room_id: str
    type: str
    sender: str
    state_key: str | None = None
    content: Mapping[str, Any] = attrs.field(default=_EMPTY, converter=_frozen_mapping)
    origin_server_ts: int = 0
    unsigned: Mapping[str, Any] = attrs.field(default=_EMPTY, converter=_frozen_mapping)
    redacts: str | None = None
    room_version: str | None = None
    rejected: bool = False
    rejection_reason: str | None = None
    outlier: bool = False
    redacted: bool = False
    redacted_by: str | None = None

    @property
    def is_state(self) -> bool:
        """Whether this is a state event (it has a state key, maybe empty)."""
        return self.state_key is not None

    @property
    def membership(self) -> str | None:
        """``content.membership`` of an ``m.room.member`` event, else None."""
        if self.type != "m.room.member":
            return None
        value = self.content.get("membership")
        return value if isinstance(value, str) else None

    def as_dict(self) -> dict[str, Any]:
        """Every field by name, in declaration order, content and unsigned
        as plain (thawed) JSON values: what ``watch --json`` and the export
        messages carry."""
        return _fields(self)


@attrs.frozen
class MissingEvent:
    """An event the source never found, after every retry the policy allows.

    Purged history, an event rejected where the source hides rejected events
    (the admin API), or a replica that never caught up.  The client passes it
    on instead of waiting for ever: positions still move on.

    Attributes:
        event_id: the event that was asked for.
        room_id: its room, from the replication row (None if not known).
        type: its type, from the replication row (None if not known).
        reason: why it is given up on, for logs.
    """

    event_id: str
    room_id: str | None
    type: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """Every field by name, in declaration order."""
        return _fields(self)


@attrs.frozen
class EventsReceived:
    """One token's full events from one writer, in stream order, filtered.

    ``events`` holds a :class:`MissingEvent` where the source had no content
    (purged, never visible): it is delivered, named, never silently dropped.
    ``fetched`` is True when the rows came over HTTP rather than as RDATA.
    """

    stream: str
    writer: str
    token: int
    events: tuple[FullEvent | MissingEvent, ...]
    fetched: bool
