"""What the exporter sends: one JSON message per row or per full event.

Pure: a batch the client delivered in, messages out.  Each message carries an
``id`` that is the same every time the same row is exported (after a crash,
a refetch, a restart from an older checkpoint), so a sink or a consumer can
drop what it already has.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import orjson

from synrepl._json import dumps
from synrepl.events import EventsReceived, FullEvent
from synrepl.positions import RowsReceived

__all__ = ("ExportMessage", "messages_of_rows", "messages_of_events")


@attrs.frozen
class ExportMessage:
    """One message for a sink.

    Attributes:
        id: the stable message id, ``SERVER/STREAM/WRITER/TOKEN/N`` for a
            row (N: its place among the token's rows) and
            ``SERVER/events/WRITER/TOKEN/EVENT_ID`` for a full event; the
            idempotency key sinks de-duplicate on.
        stream: the stream the row belongs to.
        writer: the instance that wrote it.
        token: its stream token.
        key: what partitions split on (the room, by default), None when the
            row has no such field.
        body: the message as a JSON object (it holds ``id``, ``stream``,
            ``writer`` and ``token`` too).
        data: ``body`` encoded as compact UTF-8 JSON: what goes on the wire.
    """

    id: str
    stream: str
    writer: str
    token: int
    key: str | None
    body: dict[str, Any] = attrs.field(eq=False, repr=False)
    data: bytes = attrs.field(eq=False, repr=False)


def _message(body: dict[str, Any], key_field: str) -> ExportMessage:
    key = body.get(key_field)
    if key is None and isinstance(body.get("row"), dict):
        key = body["row"].get(key_field)
    return ExportMessage(
        id=body["id"],
        stream=body["stream"],
        writer=body["writer"],
        token=body["token"],
        key=None if key is None else str(key),
        body=body,
        data=_encoded(body),
    )


def _encoded(body: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; ASCII-escaped where orjson refuses the value (an
    integer beyond 64 bits, a lone surrogate: both allowed in old rooms)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return dumps(body).encode("ascii")


def messages_of_rows(
    server_name: str,
    batch: RowsReceived,
    *,
    key_field: str = "room_id",
    keep: Iterable[int] | None = None,
) -> list[ExportMessage]:
    """One message per row of a token's batch: ``row`` (its fields) beside
    the common ones, and ``kind`` on the events stream's rows (``ev`` an event,
    ``state`` a current-state entry, ``state-all`` a room's whole state).

    Args:
        server_name: the homeserver's name, the first part of every id.
        batch: one token's rows from one writer.
        key_field: the field (of the message, else of its row) partitions
            split on.
        keep: the places (0-based) of the rows to export; None: every row.
            Ids stay the rows' places in the whole batch, so a filter never
            changes an id.
    """
    places = range(len(batch.rows)) if keep is None else keep
    prefix = f"{server_name}/{batch.stream}/{batch.writer}/{batch.token}"
    messages = []
    for n in places:
        row = batch.rows[n]
        body = {
            "id": f"{prefix}/{n}",
            "server": server_name,
            "stream": batch.stream,
            "writer": batch.writer,
            "token": batch.token,
            "row": row.as_dict(),
        }
        if row.TYPE_ID is not None:  # the events stream's "ev" or "state"
            body["kind"] = row.TYPE_ID
        messages.append(_message(body, key_field))
    return messages


def messages_of_events(
    server_name: str, batch: EventsReceived, *, key_field: str = "room_id"
) -> list[ExportMessage]:
    """One message per full event of a token: every field of
    :class:`~synrepl.events.FullEvent` (``event_id``, ``room_id``, ``type``,
    ``sender``, ``state_key``, ``content``, ``origin_server_ts``,
    ``unsigned``, ``redacts``, ``room_version``, ``rejected``,
    ``rejection_reason``, ``outlier``, ``redacted``, ``redacted_by``) beside
    the common ones.

    An event the source never found is still a message (``missing`` holds
    why, and there is no ``sender`` or ``content``): named, never dropped.

    Args:
        server_name: the homeserver's name, the first part of every id.
        batch: one token's full events from one writer.
        key_field: the field partitions split on.
    """
    prefix = f"{server_name}/{batch.stream}/{batch.writer}/{batch.token}"
    messages = []
    for event in batch.events:
        body: dict[str, Any] = {
            "id": f"{prefix}/{event.event_id}",
            "server": server_name,
            "stream": batch.stream,
            "writer": batch.writer,
            "token": batch.token,
        }
        if isinstance(event, FullEvent):
            body.update(event.as_dict())
        else:
            body.update(event_id=event.event_id, room_id=event.room_id, type=event.type)
            body["missing"] = event.reason
        messages.append(_message(body, key_field))
    return messages
