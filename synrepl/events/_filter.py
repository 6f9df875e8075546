"""Which events an observer wants, decided from the replication row where possible.

An ``events`` row already names the room, the type, the membership and
whether the event was rejected: a filter on those never needs the event's
content, so rows it refuses are never fetched.  Only a sender filter has to
wait for the full event.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterable

import attrs

from synrepl.errors import shown
from synrepl.events._model import FullEvent
from synrepl.streams import EventRow

__all__ = ("EventFilter",)

_WILDCARDS = frozenset("*?[")


def _patterns(name: str, value: object) -> tuple[str, ...] | None:
    """Validate a collection of shell-style patterns (None: no restriction)."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise TypeError(f"{name} must be a list of strings, got {shown(value)}")
    if not value:
        raise ValueError(f"{name} is empty and would match nothing; leave it out to allow any")
    items: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{name}: not a string: {shown(item)}")
        if not item or item.isspace():
            raise ValueError(f"{name}: empty pattern")
        if item != item.strip():
            raise ValueError(f"{name}: pattern has leading or trailing spaces: {item!r}")
        items.append(item)
    return tuple(dict.fromkeys(items))


_Matcher = tuple[frozenset[str], "re.Pattern[str] | None"]


def _rooms(value: Collection[str] | None) -> tuple[str, ...] | None:
    return _patterns("rooms", value)


def _types(value: Collection[str] | None) -> tuple[str, ...] | None:
    return _patterns("types", value)


def _senders(value: Collection[str] | None) -> tuple[str, ...] | None:
    return _patterns("senders", value)


def _memberships(value: Collection[str] | None) -> tuple[str, ...] | None:
    return _patterns("memberships", value)


def _matcher(patterns: tuple[str, ...] | None) -> _Matcher | None:
    """A compiled test: exact names in a set, wildcards in one regex."""
    if patterns is None:
        return None
    exact = frozenset(p for p in patterns if not _WILDCARDS & set(p))
    wild = [p for p in patterns if _WILDCARDS & set(p)]
    regex = re.compile("|".join(fnmatch.translate(p) for p in wild)) if wild else None
    return exact, regex


def _matches(matcher: _Matcher, value: str) -> bool:
    exact, regex = matcher
    return value in exact or (regex is not None and regex.match(value) is not None)


@attrs.frozen
class EventFilter:
    """Rooms, event types, senders and memberships an observer wants.

    Each criterion left as None allows anything; given ones must all hold.
    Patterns are shell-style (``*``, ``?``, ``[...]``; :mod:`fnmatch`, case
    sensitive): ``"m.room.*"``, ``"@_bridge_*:example.org"``.

    Attributes:
        rooms: room IDs (exact).
        types: event type patterns.
        senders: sender user ID patterns; the only criterion that needs the
            full event.
        memberships: for ``m.room.member`` events only, the memberships
            wanted (``"join"``, ``"leave"``, ...); other events are not
            affected.  Combine with ``types=["m.room.member"]`` for
            membership changes alone.
        include_rejected: whether events the server rejected pass (the admin
            API source never finds them).

    Raises:
        ValueError: a criterion is a bare string instead of a list, is
            empty, or holds an empty pattern.
    """

    rooms: tuple[str, ...] | None = attrs.field(default=None, converter=_rooms)
    types: tuple[str, ...] | None = attrs.field(default=None, converter=_types)
    senders: tuple[str, ...] | None = attrs.field(default=None, converter=_senders)
    memberships: tuple[str, ...] | None = attrs.field(default=None, converter=_memberships)
    include_rejected: bool = True

    _rooms: frozenset[str] | None = attrs.field(init=False, eq=False, repr=False)
    _types: _Matcher | None = attrs.field(init=False, eq=False, repr=False)
    _senders: _Matcher | None = attrs.field(init=False, eq=False, repr=False)
    _memberships: frozenset[str] | None = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        for name in ("rooms", "memberships"):
            for item in getattr(self, name) or ():
                if _WILDCARDS & set(item):
                    raise ValueError(f"{name}: no wildcards here, got {item!r}")
        rooms = None if self.rooms is None else frozenset(self.rooms)
        memberships = None if self.memberships is None else frozenset(self.memberships)
        object.__setattr__(self, "_rooms", rooms)
        object.__setattr__(self, "_types", _matcher(self.types))
        object.__setattr__(self, "_senders", _matcher(self.senders))
        object.__setattr__(self, "_memberships", memberships)

    def _common(
        self, room_id: str, type: str, membership: str | None, rejected: bool
    ) -> bool | None:
        """The criteria a row can answer; None when the membership is unknown."""
        if rejected and not self.include_rejected:
            return False
        if self._rooms is not None and room_id not in self._rooms:
            return False
        if self._types is not None and not _matches(self._types, type):
            return False
        if self._memberships is not None and type == "m.room.member":
            if membership is None:
                return None
            if membership not in self._memberships:
                return False
        return True

    def row_decides(self, row: EventRow) -> bool | None:
        """What the replication row alone says.

        Returns:
            False: refuse it, without fetching anything; True: accept it, the
            full event cannot change that; None: only the full event can
            tell (a sender filter, or a member row without its membership).
        """
        verdict = self._common(row.room_id, row.type, row.membership, row.rejected)
        if verdict is False:
            return False
        if self._senders is not None:
            return None
        return verdict

    def accepts(self, event: FullEvent) -> bool:
        """Whether the full event passes every criterion."""
        if self._common(event.room_id, event.type, event.membership, event.rejected) is not True:
            return False
        return self._senders is None or _matches(self._senders, event.sender)

    def wanted(self, rows: Iterable[EventRow]) -> list[EventRow]:
        """The rows worth fetching: those the row alone does not refuse."""
        return [row for row in rows if self.row_decides(row) is not False]
