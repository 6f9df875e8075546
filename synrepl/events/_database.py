"""Reading full events and stream positions out of Synapse's own database.

Shared by the PostgreSQL and SQLite sources: the SQL is written once with
``?`` placeholders, and each source hands in a function that runs one
statement and returns its rows.  Every statement only reads.

Where Synapse (1.163.2) keeps what a :class:`~synrepl.events.FullEvent` holds:

- ``events``: one row per event: ``room_id``, ``stream_ordering`` (its
  token on the ``events`` stream, negative for backfilled events),
  ``outlier``;
- ``event_json.json``: the event as received (sender, type, state_key,
  content, origin_server_ts, unsigned, redacts); the event ID and the room
  version are not in it for newer room versions, so both come from the rows;
- ``rooms.room_version``;
- ``rejections.reason``: present for rejected events;
- ``redactions (event_id, redacts, recheck, have_censored)``: one row per
  redaction event.  ``recheck`` false means Synapse has already validated
  it; true means it applies only if the redaction event is known, not
  rejected, in the same room and, when its ``internal_metadata`` says
  ``recheck_redaction``, sent from the redacted sender's server.  Once
  censored (after ``redaction_retention_period``) ``event_json.json`` itself
  holds the pruned event;
- ``room_ban_redactions (room_id, user_id, redacting_event_id,
  redact_end_ordering)``: a ban that redacts every event of the user in the
  room sent before ``redact_end_ordering`` (MSC4293), checked like an
  unvalidated redaction.

``m.room.create`` events are never redacted.

Older releases lack the newest of these (:class:`Schema`, read from the
database's catalog once per source).  Before ``redactions.recheck`` (schema
94: in 1.162.0, not in 1.141.0) Synapse checked every redaction when it read
the event, which is what a missing column is taken to mean here; before
``room_ban_redactions`` (a schema 92 delta: in 1.141.0, not in 1.110.0) no
ban redacted anything.

Positions: each writer of the ``events`` stream records its position in
``stream_positions`` (``stream_name = 'events'``) after each write, on
PostgreSQL and SQLite alike (a single-writer homeserver has one writer,
``master``).  A writer that has been idle while others wrote is, in fact,
further on: Synapse takes the smallest recorded position and walks up
through the stream IDs that exist in ``events``, ``current_state_delta_stream``
and ``ex_outlier_stream`` (the three tables that take IDs from the events
stream) while they have no holes; every writer is at least there.  This
module does the same, bounded to :data:`POSITION_SCAN_LIMIT` IDs, which can
only make a position lower (never past an event that is not yet persisted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from synrepl import _json
from synrepl.events._model import FullEvent
from synrepl.events._redaction import redacted_content

__all__ = (
    "Run",
    "Schema",
    "SchemaReader",
    "fetch_events",
    "read_positions",
    "POSITION_SCAN_LIMIT",
    "event_from_pdu",
)

logger = logging.getLogger(__name__)

#: Runs one statement (``?`` placeholders) with its arguments, returns all rows.
Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]

#: The most stream IDs read above the lowest recorded writer position.
POSITION_SCAN_LIMIT = 100_000

_EVENTS_SQL = """
SELECT e.event_id, e.room_id, e.stream_ordering, e.outlier,
       j.json, r.room_version, rj.reason
FROM events AS e
JOIN event_json AS j ON j.event_id = e.event_id
LEFT JOIN rooms AS r ON r.room_id = e.room_id
LEFT JOIN rejections AS rj ON rj.event_id = e.event_id
WHERE e.event_id IN ({marks})
"""

_REDACTIONS_SQL = """
SELECT d.redacts, d.event_id, {recheck},
       x.room_id, x.sender, xr.reason, xj.internal_metadata
FROM redactions AS d
LEFT JOIN events AS x ON x.event_id = d.event_id
LEFT JOIN event_json AS xj ON xj.event_id = d.event_id
LEFT JOIN rejections AS xr ON xr.event_id = d.event_id
WHERE d.redacts IN ({marks})
"""

_BAN_REDACTIONS_SQL = """
SELECT b.room_id, b.user_id, b.redacting_event_id, b.redact_end_ordering,
       x.room_id, x.sender, xr.reason, xj.internal_metadata
FROM room_ban_redactions AS b
LEFT JOIN events AS x ON x.event_id = b.redacting_event_id
LEFT JOIN event_json AS xj ON xj.event_id = b.redacting_event_id
LEFT JOIN rejections AS xr ON xr.event_id = b.redacting_event_id
WHERE b.room_id IN ({rooms}) AND b.user_id IN ({users})
"""

_POSITIONS_SQL = "SELECT instance_name, stream_id FROM stream_positions WHERE stream_name = ?"

_IDS_ABOVE_SQL = """
SELECT stream_ordering FROM events WHERE stream_ordering > ?
UNION SELECT stream_id FROM current_state_delta_stream WHERE stream_id > ?
UNION SELECT event_stream_ordering FROM ex_outlier_stream WHERE event_stream_ordering > ?
ORDER BY 1
LIMIT ?
"""

_MAX_ID_SQL = """
SELECT MAX(m) FROM (
  SELECT MAX(stream_ordering) AS m FROM events
  UNION ALL SELECT MAX(stream_id) FROM current_state_delta_stream
  UNION ALL SELECT MAX(event_stream_ordering) FROM ex_outlier_stream
) AS maxima
"""


@attrs.frozen
class Schema:
    """Which of the newer parts of Synapse's schema this database has.

    Attributes:
        redaction_recheck: ``redactions.recheck`` exists.
        ban_redactions: the ``room_ban_redactions`` table exists.
    """

    redaction_recheck: bool = True
    ban_redactions: bool = True


class SchemaReader:
    """Reads :class:`Schema` from the catalog once, then remembers it.

    ``columns_sql`` takes a table name (one ``?``) and returns its column
    names, one per row: each database asks its own catalog.
    """

    def __init__(self, columns_sql: str) -> None:
        self._columns_sql = columns_sql
        self._schema: Schema | None = None

    def __call__(self, run: Run) -> Schema:
        if self._schema is None:
            redactions = {str(r[0]) for r in run(self._columns_sql, ["redactions"])}
            bans = run(self._columns_sql, ["room_ban_redactions"])
            self._schema = Schema(
                redaction_recheck="recheck" in redactions, ban_redactions=bool(bans)
            )
            if self._schema != Schema():
                logger.info("an older Synapse schema: %s", self._schema)
        return self._schema


def _chunks(values: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _domain(user_id: object) -> str | None:
    if not isinstance(user_id, str) or ":" not in user_id:
        return None
    return user_id.split(":", 1)[1]


def _metadata_rechecks(internal_metadata: object) -> bool:
    """Whether a redaction's own metadata asks for the same-server check."""
    if not isinstance(internal_metadata, str):
        return False
    try:
        data = _json.loads(internal_metadata)
    except ValueError:
        return False
    return isinstance(data, dict) and bool(data.get("recheck_redaction", False))


def _valid_unchecked(
    redacted_room: str,
    redacted_sender: object,
    redaction_room: object,
    redaction_sender: object,
    redaction_rejected: object,
    internal_metadata: object,
) -> bool:
    """Whether a redaction that Synapse has not validated yet applies."""
    if redaction_room is None or redaction_rejected is not None:
        return False  # unknown or rejected redaction event
    if redaction_room != redacted_room:
        return False
    if _metadata_rechecks(internal_metadata):
        return _domain(redaction_sender) == _domain(redacted_sender)
    return True


def event_from_pdu(
    pdu: Mapping[str, Any],
    *,
    event_id: str,
    room_id: str | None = None,
    room_version: str | None = None,
    rejection_reason: str | None = None,
    outlier: bool = False,
    redacted: bool = False,
    redacted_by: str | None = None,
) -> FullEvent:
    """A FullEvent from an event's JSON (as stored, or as the admin API gives it).

    A redacted event's content is reduced by the room version's redaction
    rules here, whether or not Synapse has censored the stored copy yet.  A
    redaction's content names what it redacts, as the client API shows it:
    older releases (1.98.0 does) stored that only at the top level in rooms
    before version 11.
    """
    event_type = pdu.get("type")
    event_type = event_type if isinstance(event_type, str) else ""
    raw_content = pdu.get("content")
    content: Mapping[str, Any] = raw_content if isinstance(raw_content, dict) else {}
    redacts = pdu.get("redacts")
    if not isinstance(redacts, str):
        redacts = content.get("redacts") if event_type == "m.room.redaction" else None
        redacts = redacts if isinstance(redacts, str) else None
    if redacted:
        content = redacted_content(event_type, content, room_version)
    elif redacts is not None and "redacts" not in content:
        content = {**content, "redacts": redacts}
    state_key = pdu.get("state_key")
    sender = pdu.get("sender")
    ts = pdu.get("origin_server_ts")
    unsigned = pdu.get("unsigned")
    if room_id is None:
        pdu_room = pdu.get("room_id")
        room_id = pdu_room if isinstance(pdu_room, str) else ""
    return FullEvent(
        event_id=event_id,
        room_id=room_id,
        type=event_type,
        sender=sender if isinstance(sender, str) else "",
        state_key=state_key if isinstance(state_key, str) else None,
        content=content,
        origin_server_ts=ts if isinstance(ts, int) and not isinstance(ts, bool) else 0,
        unsigned=unsigned if isinstance(unsigned, dict) else {},
        redacts=redacts,
        room_version=room_version,
        rejected=rejection_reason is not None,
        rejection_reason=rejection_reason,
        outlier=outlier,
        redacted=redacted,
        redacted_by=redacted_by,
    )


class _Stored:
    """One event's rows, before redactions are applied."""

    __slots__ = (
        "event_id",
        "outlier",
        "pdu",
        "redacted",
        "redacted_by",
        "rejection_reason",
        "room_id",
        "room_version",
        "stream_ordering",
    )

    def __init__(self, row: tuple[Any, ...], pdu: dict[str, Any]) -> None:
        event_id, room_id, stream_ordering, outlier, _, room_version, reason = row
        self.event_id: str = event_id
        self.room_id: str = room_id
        self.stream_ordering: int | None = stream_ordering
        self.outlier = bool(outlier)  # 0/1 on SQLite
        self.pdu = pdu
        self.room_version: str | None = room_version
        self.rejection_reason: str | None = reason
        self.redacted = False
        self.redacted_by: str | None = None

    @property
    def sender(self) -> object:
        return self.pdu.get("sender")

    def redact(self, by: str) -> None:
        if self.pdu.get("type") == "m.room.create" or self.redacted:
            return
        self.redacted, self.redacted_by = True, by


def fetch_events(
    run: Run, event_ids: Iterable[str], chunk: int, schema: Schema | None = None
) -> dict[str, FullEvent]:
    """The events of ``event_ids`` found in the database (three queries per
    chunk), read as ``schema`` says the database is laid out (default: the
    newest release's)."""
    schema = schema or Schema()
    wanted = list(dict.fromkeys(event_ids))
    found: dict[str, _Stored] = {}
    for ids in _chunks(wanted, chunk):
        for row in run(_EVENTS_SQL.format(marks=_marks(len(ids))), ids):
            try:
                pdu = _json.loads(row[4])
            except ValueError:
                pdu = None
            if not isinstance(pdu, dict):
                logger.warning("event %s: its stored JSON does not decode; skipped", row[0])
                continue
            found[row[0]] = _Stored(row, pdu)
    if not found:
        return {}
    ids_found = list(found)
    for ids in _chunks(ids_found, chunk):
        recheck = "d.recheck" if schema.redaction_recheck else "1"
        rows = run(_REDACTIONS_SQL.format(recheck=recheck, marks=_marks(len(ids))), ids)
        # Validated redactions first, so that redacted_by names one of them.
        for redacts, by, recheck, room, sender, rejected, metadata in sorted(
            rows, key=lambda r: bool(r[2])
        ):
            event = found[redacts]
            if not recheck or _valid_unchecked(
                event.room_id, event.sender, room, sender, rejected, metadata
            ):
                event.redact(by)
    if schema.ban_redactions:
        _apply_ban_redactions(run, found, chunk)
    return {
        e.event_id: event_from_pdu(
            e.pdu,
            event_id=e.event_id,
            room_id=e.room_id,
            room_version=e.room_version,
            rejection_reason=e.rejection_reason,
            outlier=e.outlier,
            redacted=e.redacted,
            redacted_by=e.redacted_by,
        )
        for e in found.values()
    }


def _apply_ban_redactions(run: Run, found: Mapping[str, _Stored], chunk: int) -> None:
    by_room_user: dict[tuple[str, str], list[_Stored]] = {}
    for event in found.values():
        if not event.redacted and isinstance(event.sender, str):
            by_room_user.setdefault((event.room_id, event.sender), []).append(event)
    if not by_room_user:
        return
    rooms = sorted({room for room, _ in by_room_user})
    users = sorted({user for _, user in by_room_user})
    half = max(1, chunk // 2)
    for room_part in _chunks(rooms, half):
        for user_part in _chunks(users, half):
            sql = _BAN_REDACTIONS_SQL.format(
                rooms=_marks(len(room_part)), users=_marks(len(user_part))
            )
            for room, user, by, end, x_room, x_sender, rejected, metadata in run(
                sql, [*room_part, *user_part]
            ):
                for event in by_room_user.get((room, user), ()):
                    if end is not None and (event.stream_ordering or 0) >= end:
                        continue
                    if _valid_unchecked(room, user, x_room, x_sender, rejected, metadata):
                        event.redact(by)


def read_positions(
    run: Run, writers: Sequence[str] | None, scan_limit: int = POSITION_SCAN_LIMIT
) -> dict[str, dict[str, int]]:
    """Each ``events`` writer's persisted position, as Synapse would derive it."""
    recorded = {str(name): int(pos) for name, pos in run(_POSITIONS_SQL, ["events"])}
    if writers is not None:
        recorded = {name: pos for name, pos in recorded.items() if name in writers}
    if recorded:
        floor = min(recorded.values())
        upto = floor
        for (stream_id,) in run(_IDS_ABOVE_SQL, [floor, floor, floor, scan_limit]):
            if stream_id == upto + 1:
                upto = stream_id
            elif stream_id > upto:
                break  # a hole: an event not (yet) persisted, stop before it
    else:
        # Nothing recorded yet: Synapse then takes the largest ID in use.
        ((largest,),) = run(_MAX_ID_SQL, [])
        upto = max(int(largest or 1), 1)
    names = list(writers) if writers is not None else (list(recorded) or ["master"])
    return {"events": {name: max(recorded.get(name, upto), upto) for name in names}}
