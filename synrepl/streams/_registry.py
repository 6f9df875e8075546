"""Stream name -> row type, and :func:`parse_row`, the one entry point."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from synrepl.streams import events, rows
from synrepl.streams._row import RawRow, Row, compile_kind_dispatch

__all__ = ("ROW_TYPES", "EVENTS_ROW_TYPES", "STREAM_NAMES", "AnyRow", "parse_row")

#: What :func:`parse_row` returns: a typed row, or the raw fallback.
AnyRow = Row | RawRow

#: The three kinds of ``events`` rows, by their wire kind.
EVENTS_ROW_TYPES: Mapping[str, type[Row]] = MappingProxyType(
    {
        cls.TYPE_ID or "": cls
        for cls in (events.EventRow, events.CurrentStateRow, events.AllStateRow)
    }
)

_SIMPLE: tuple[type[Row], ...] = (
    events.BackfillRow,
    rows.PresenceRow,
    rows.PresenceFederationRow,
    rows.TypingRow,
    rows.ReceiptsRow,
    rows.PushRulesRow,
    rows.PushersRow,
    rows.CachesRow,
    rows.DeviceListsRow,
    rows.ToDeviceRow,
    rows.FederationRow,
    rows.AccountDataRow,
    rows.ProfileUpdatesRow,
    rows.StickyEventsRow,
    rows.ThreadSubscriptionsRow,
    rows.UnPartialStatedRoomRow,
    rows.UnPartialStatedEventRow,
    rows.QuarantinedMediaRow,
)

#: The row type of every stream that has exactly one (all but ``events``).
ROW_TYPES: Mapping[str, type[Row]] = MappingProxyType({cls.STREAM: cls for cls in _SIMPLE})

#: Every stream synrepl can type, in Synapse's registry order.
STREAM_NAMES: tuple[str, ...] = ("events", *ROW_TYPES)

_parse_events_kind = compile_kind_dispatch(EVENTS_ROW_TYPES, strict_length=False)


def _parse_events_row(raw: Any) -> AnyRow:
    row = _parse_events_kind(raw)
    return RawRow("events", raw) if row is None else row


#: Stream name -> its row parser.
ROW_PARSERS: dict[str, Callable[[Any], AnyRow]] = {
    name: cls.from_raw for name, cls in ROW_TYPES.items()
}
ROW_PARSERS["events"] = _parse_events_row


def _device_lists_type(raw: Any) -> type[Row]:
    """Two fields: the shape before Synapse 1.110 (see :mod:`synrepl.releases`)."""
    if isinstance(raw, list) and len(raw) == len(rows.DeviceListsEntityRow.FIELDS):
        return rows.DeviceListsEntityRow
    return rows.DeviceListsRow


def _parse_device_lists_row(raw: Any) -> AnyRow:
    return _device_lists_type(raw).from_raw(raw)


def _fast_device_lists_row(raw: Any) -> Row | None:
    return _device_lists_type(raw).from_fast_raw(raw)  # type: ignore[attr-defined, no-any-return]


ROW_PARSERS["device_lists"] = _parse_device_lists_row

#: Stream name -> a parser for rows decoded by the fast JSON path (orjson as
#: it comes).  It returns None wherever it cannot vouch for the row, and the
#: caller then decodes exactly: extra values, unknown kinds, a wrong type (a
#: float standing in for a big integer fails an integer field's check) and
#: free-form JSON that holds anything but flat strings, integers, booleans
#: and nulls (a float there might be a big integer).
FAST_ROW_PARSERS: dict[str, Callable[[Any], Row | None]] = {
    name: cls.from_fast_raw  # type: ignore[attr-defined]
    for name, cls in ROW_TYPES.items()
}
FAST_ROW_PARSERS["events"] = compile_kind_dispatch(EVENTS_ROW_TYPES, strict_length=True)
FAST_ROW_PARSERS["device_lists"] = _fast_device_lists_row


def parse_row(stream: str, raw: Any) -> AnyRow:
    """Turn one decoded RDATA row into its typed row.

    An unknown stream, or an ``events`` row of an unknown kind, gives a
    :class:`RawRow`; values beyond the known fields are kept in ``extras``.

    Raises:
        MalformedRowError: too few fields, or a field of the wrong type.
    """
    parser = ROW_PARSERS.get(stream)
    if parser is None:
        return RawRow(stream, raw)
    return parser(raw)
