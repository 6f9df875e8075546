"""What the endpoints answer, typed.

Each endpoint's answer has one of a few shapes (:class:`ResponseShape`):
nothing (``{}``), one number, an event id with its stream position, a new
device's credentials, one page of stream updates, or a free-form object.
A shape's parser checks the JSON it is given and raises :class:`ValueError`
naming what is wrong; :func:`synrepl.http.parse_response` turns that into a
:class:`~synrepl.http.MalformedResponseError` naming endpoint and instance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

__all__ = (
    "ResponseShape",
    "EventWritten",
    "RegisteredDevice",
    "StreamUpdates",
    "parse_nothing",
    "parse_max_stream_id",
    "parse_optional_max_stream_id",
    "parse_event_written",
    "parse_registered_device",
    "parse_stream_updates",
    "parse_object",
    "NOTHING",
    "MAX_STREAM_ID",
    "OPTIONAL_MAX_STREAM_ID",
    "EVENT_WRITTEN",
    "REGISTERED_DEVICE",
    "STREAM_UPDATES",
    "OBJECT",
)


@attrs.frozen
class EventWritten:
    """An event the called instance persisted.

    Attributes:
        event_id: the event's id.
        stream_id: its position in the ``events`` stream of the writer.
    """

    event_id: str
    stream_id: int


@attrs.frozen
class RegisteredDevice:
    """A device registered (or re-registered) by the main process, with the
    credentials it issued. The tokens never show in a repr.

    Attributes:
        device_id: the device id (the one asked for, or a new one).
        access_token: the new access token.
        valid_until_ms: when the access token expires, or None.
        refresh_token: the refresh token, when one was asked for.
    """

    device_id: str
    access_token: str = attrs.field(repr=False)
    valid_until_ms: int | None
    refresh_token: str | None = attrs.field(repr=False)


@attrs.frozen
class StreamUpdates:
    """One page of a writer's stream history, ``from_token < token <= upto_token``.

    Attributes:
        updates: ``(token, row)`` pairs; each row is the raw JSON row (type it
            with :func:`synrepl.streams.parse_row`).
        upto_token: how far this page goes; ask again from here while
            ``limited``.
        limited: true when the writer had more rows than fit in one page.
    """

    updates: list[tuple[int, Any]]
    upto_token: int
    limited: bool


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(body: Mapping[str, Any], name: str, check: Callable[[object], bool], what: str) -> Any:
    if name not in body:
        raise ValueError(f"missing {name!r}")
    value = body[name]
    if not check(value):
        raise ValueError(f"{name!r} must be {what}, got {type(value).__name__}")
    return value


def _opt_int(value: object) -> bool:
    return value is None or _is_int(value)


def _opt_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def _str(value: object) -> bool:
    return isinstance(value, str)


def parse_nothing(body: Mapping[str, Any]) -> None:
    """An endpoint that answers ``{}``: there is nothing to return."""


def parse_max_stream_id(body: Mapping[str, Any]) -> int:
    """``{"max_stream_id": int}``: the stream position after the write."""
    value: int = _field(body, "max_stream_id", _is_int, "an integer")
    return value


def parse_optional_max_stream_id(body: Mapping[str, Any]) -> int | None:
    """``{"max_stream_id": int or null}`` (null: there was nothing to remove)."""
    value: int | None = _field(body, "max_stream_id", _opt_int, "an integer or null")
    return value


def parse_event_written(body: Mapping[str, Any]) -> EventWritten:
    """``{"event_id": str, "stream_id": int}``."""
    return EventWritten(
        event_id=_field(body, "event_id", _str, "a string"),
        stream_id=_field(body, "stream_id", _is_int, "an integer"),
    )


def parse_registered_device(body: Mapping[str, Any]) -> RegisteredDevice:
    """``{"device_id", "access_token", "valid_until_ms", "refresh_token"}``."""
    return RegisteredDevice(
        device_id=_field(body, "device_id", _str, "a string"),
        access_token=_field(body, "access_token", _str, "a string"),
        valid_until_ms=_field(body, "valid_until_ms", _opt_int, "an integer or null"),
        refresh_token=_field(body, "refresh_token", _opt_str, "a string or null"),
    )


def _is_update(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and _is_int(value[0])


def parse_stream_updates(body: Mapping[str, Any]) -> StreamUpdates:
    """``{"updates": [[token, row], ...], "upto_token": int, "limited": bool}``."""
    raw = _field(body, "updates", lambda v: isinstance(v, list), "a list")
    for item in raw:
        if not _is_update(item):
            raise ValueError("each of 'updates' must be a [token, row] pair with an integer token")
    return StreamUpdates(
        updates=[(token, row) for token, row in raw],
        upto_token=_field(body, "upto_token", _is_int, "an integer"),
        limited=_field(body, "limited", lambda v: isinstance(v, bool), "true or false"),
    )


def parse_object(body: Mapping[str, Any]) -> dict[str, Any]:
    """A free-form JSON object, returned as it came."""
    return dict(body)


@attrs.frozen
class ResponseShape:
    """How one kind of answer looks and how to read it.

    Attributes:
        annotation: the Python type a stub returns, as written in the stubs.
        parser: turns the answer body into that type; raises ``ValueError``.
        doc: the JSON answer, in words (used in docs and stub docstrings).
        fields: the answer's fields (empty for nothing or a free-form object).
    """

    annotation: str
    parser: Callable[[Mapping[str, Any]], Any]
    doc: str
    fields: tuple[str, ...] = ()


NOTHING = ResponseShape("None", parse_nothing, "`{}`; the stub returns None")
MAX_STREAM_ID = ResponseShape(
    "int",
    parse_max_stream_id,
    '`{"max_stream_id": int}`; the stub returns the integer',
    ("max_stream_id",),
)
OPTIONAL_MAX_STREAM_ID = ResponseShape(
    "int | None",
    parse_optional_max_stream_id,
    '`{"max_stream_id": int or null}`; the stub returns it (None: nothing was removed)',
    ("max_stream_id",),
)
EVENT_WRITTEN = ResponseShape(
    "EventWritten",
    parse_event_written,
    '`{"event_id": str, "stream_id": int}`; the stub returns an `EventWritten`',
    ("event_id", "stream_id"),
)
REGISTERED_DEVICE = ResponseShape(
    "RegisteredDevice",
    parse_registered_device,
    '`{"device_id", "access_token", "valid_until_ms", "refresh_token"}`; '
    "the stub returns a `RegisteredDevice` (tokens hidden from its repr)",
    ("device_id", "access_token", "valid_until_ms", "refresh_token"),
)
STREAM_UPDATES = ResponseShape(
    "StreamUpdates",
    parse_stream_updates,
    '`{"updates": [[token, row], ...], "upto_token": int, "limited": bool}`; '
    "returned as `StreamUpdates`",
    ("updates", "upto_token", "limited"),
)
OBJECT = ResponseShape("dict[str, Any]", parse_object, "a JSON object, returned as a dict")
