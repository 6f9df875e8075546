"""Hypothesis strategies for replication commands, rows and wire lines.

Use them to property-test your own worker::

    from hypothesis import given
    from synrepl.testing import strategies as rs

    @given(rs.commands())
    def test_my_handler_never_crashes(cmd):
        my_handler.handle(cmd)

Every strategy draws values that :func:`synrepl.encode` can put on the wire
and :func:`synrepl.parse_line` reads back equal, so ``encode`` followed by
``parse_line`` is an identity over all of them.  Rows are drawn in their
normalised form (booleans as ``bool``, lists as tuples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from synrepl import commands as c
from synrepl.streams import EVENTS_ROW_TYPES, ROW_TYPES, STREAM_NAMES, EventRow, RawRow, Row
from synrepl.testing.traffic import Announce, DropConnections, Pause, Step, Traffic, Write

__all__ = (
    "words",
    "json_values",
    "rows",
    "rows_for",
    "any_rows",
    "raw_rows",
    "commands",
    "rdata_commands",
    "position_commands",
    "lines",
    "tokens",
    "server_names",
    "user_ids",
    "room_ids",
    "event_ids",
    "event_types",
    "event_rows",
    "MESSAGE_TYPES",
    "STATE_TYPES",
    "traffic",
)

_WORD_ALPHABET = st.characters(codec="utf-8", exclude_characters=" \n")


def words(max_size: int = 30) -> st.SearchStrategy[str]:
    """Non-empty text without spaces or newlines: instance names, user ids, ..."""
    return st.text(_WORD_ALPHABET, min_size=1, max_size=max_size)


def _texts() -> st.SearchStrategy[str]:
    """Any text JSON can carry (newlines are escaped inside JSON)."""
    return st.text(st.characters(codec="utf-8"), max_size=30)


def tokens() -> st.SearchStrategy[int]:
    """Stream tokens as Synapse produces them (non-negative, 63-bit)."""
    return st.integers(min_value=0, max_value=2**63 - 1)


_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def json_values(max_leaves: int = 10) -> st.SearchStrategy[Any]:
    """JSON values that survive Synapse's encoder (no NaN, no Infinity)."""
    scalars = (
        st.none()
        | st.booleans()
        | _ints
        | _texts()
        | st.floats(allow_nan=False, allow_infinity=False)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts(), inner, max_size=4),
        max_leaves=max_leaves,
    )


def _json_objects() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(_texts(), json_values(5), max_size=4)


_FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "str": _texts(),
    "str | None": st.none() | _texts(),
    "int": _ints,
    "int | None": st.none() | _ints,
    "bool": st.booleans(),
    "tuple[str, ...]": st.lists(_texts(), max_size=4).map(tuple),
    "tuple[str, ...] | None": st.none() | st.lists(_texts(), max_size=4).map(tuple),
    "tuple[Any, ...] | None": st.none() | st.lists(json_values(3), max_size=3).map(tuple),
    "dict[str, Any]": _json_objects(),
}


def rows(row_type: type[Row], *, extras: bool = False) -> st.SearchStrategy[Row]:
    """Rows of one row type; with ``extras``, sometimes trailing unknown values."""
    values = [_FIELD_STRATEGIES[annotation] for annotation in row_type.FIELD_TYPES]
    extra = st.lists(json_values(3), max_size=2).map(tuple) if extras else st.just(())
    return st.builds(lambda vals, ext: row_type.from_values(vals, ext), st.tuples(*values), extra)


def rows_for(stream: str, *, extras: bool = False) -> st.SearchStrategy[Row]:
    """Rows of a named stream (for ``events``: any of its three kinds)."""
    if stream == "events":
        return st.one_of([rows(t, extras=extras) for t in EVENTS_ROW_TYPES.values()])
    return rows(ROW_TYPES[stream], extras=extras)


def raw_rows() -> st.SearchStrategy[RawRow]:
    """Rows of streams synrepl does not know (what a newer Synapse may add)."""
    unknown = words(20).filter(lambda name: name not in STREAM_NAMES)
    return st.builds(RawRow, unknown, json_values())


def any_rows(*, extras: bool = False) -> st.SearchStrategy[tuple[str, Row | RawRow]]:
    """``(stream, row)`` pairs over every known stream, plus unknown ones."""
    known = st.sampled_from(STREAM_NAMES).flatmap(
        lambda s: rows_for(s, extras=extras).map(lambda r: (s, r))
    )
    return known | raw_rows().map(lambda r: (r.stream, r))


@st.composite
def rdata_commands(
    draw: st.DrawFn,
    streams: st.SearchStrategy[str] | None = None,
    *,
    extras: bool = False,
) -> c.RdataCommand:
    """RDATA commands with typed rows (``batch`` tokens included)."""
    if streams is None:
        stream, row = draw(any_rows(extras=extras))
    else:
        stream = draw(streams)
        row = (
            draw(rows_for(stream, extras=extras))
            if stream in STREAM_NAMES
            else draw(json_values().map(lambda data: RawRow(stream, data)))
        )
    token = draw(st.none() | tokens())
    return c.RdataCommand(stream, draw(words()), token, row)


def position_commands(
    streams: st.SearchStrategy[str] | None = None,
) -> st.SearchStrategy[c.PositionCommand]:
    """POSITION commands (``prev_token <= new_token``, as writers send them)."""
    stream_names = streams if streams is not None else st.sampled_from(STREAM_NAMES)
    return st.builds(
        lambda s, i, a, b: c.PositionCommand(s, i, min(a, b), max(a, b)),
        stream_names,
        words(),
        tokens(),
        tokens(),
    )


def _texts_on_one_line() -> st.SearchStrategy[str]:
    return st.text(
        st.characters(codec="utf-8", exclude_characters="\n"),
        max_size=30,
    )


def _user_ips() -> st.SearchStrategy[c.UserIpCommand]:
    return st.builds(
        c.UserIpCommand, words(), _texts(), _texts(), _texts(), st.none() | _texts(), _ints
    )


def commands(*, extras: bool = False) -> st.SearchStrategy[c.Command]:
    """Any replication command, in the current dialect."""
    one_line = _texts_on_one_line()
    return st.one_of(
        rdata_commands(extras=extras),
        position_commands(),
        st.just(c.ReplicateCommand()),
        st.builds(
            c.UserSyncCommand,
            words(),
            words(),
            st.none() | words().filter(lambda d: d != "None"),
            st.booleans(),
            _ints,
        ),
        st.builds(c.ClearUserSyncCommand, words()),
        st.builds(c.FederationAckCommand, words(), _ints),
        _user_ips(),
        st.builds(c.RemoteServerUpCommand, one_line.filter(bool)),
        st.builds(c.LockReleasedCommand, _texts(), _texts(), _texts()),
        st.builds(c.NewActiveTaskCommand, one_line.filter(bool)),
        st.builds(c.CancelTaskCommand, one_line.filter(bool)),
        st.builds(c.PingCommand, one_line),
        st.builds(c.ErrorCommand, one_line),
        st.builds(c.NameCommand, one_line.filter(bool)),
        st.builds(c.ServerCommand, one_line.filter(bool)),
    )


def lines(*, extras: bool = False) -> st.SearchStrategy[str]:
    """Valid wire lines, as :func:`synrepl.encode` writes them."""
    return commands(extras=extras).map(c.encode)


# --- realistic Matrix values ---------------------------------------------------------
#
# ``rows()`` draws any value a field's type allows: right for a parser, which
# must take whatever comes.  A handler's test wants what Synapse writes: the
# strategies below draw identifiers in the Matrix grammar and event rows
# whose fields agree with each other.

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_LOCALPART = st.from_regex(r"[a-z0-9._=/+-]{1,16}", fullmatch=True)
_OPAQUE = st.from_regex(r"[A-Za-z]{18}", fullmatch=True)
_EVENT_ID_BODY = st.from_regex(r"[A-Za-z0-9_-]{43}", fullmatch=True)

#: Message-like (non-state) event types Synapse sees most.
MESSAGE_TYPES = (
    "m.room.message",
    "m.room.encrypted",
    "m.reaction",
    "m.room.redaction",
    "m.sticker",
    "m.call.invite",
)
#: State event types, each with the state key it usually has ("" or a user).
STATE_TYPES = (
    "m.room.create",
    "m.room.member",
    "m.room.power_levels",
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.encryption",
)
_MEMBERSHIPS = ("join", "leave", "invite", "ban", "knock")


def server_names() -> st.SearchStrategy[str]:
    """Server names: DNS names (sometimes with a port) or IPv4 literals."""
    dns = st.lists(_LABEL, min_size=2, max_size=4).map(".".join)
    ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
    host = dns | ipv4
    port = st.none() | st.integers(1, 65535)
    return st.builds(lambda h, p: h if p is None else f"{h}:{p}", host, port)


def user_ids(server_name: str | None = None) -> st.SearchStrategy[str]:
    """``@localpart:server`` with the spec's localpart characters."""
    servers = st.just(server_name) if server_name is not None else server_names()
    return st.builds(lambda local, server: f"@{local}:{server}", _LOCALPART, servers)


def room_ids(server_name: str | None = None) -> st.SearchStrategy[str]:
    """``!opaque:server``, as Synapse makes them."""
    servers = st.just(server_name) if server_name is not None else server_names()
    return st.builds(lambda opaque, server: f"!{opaque}:{server}", _OPAQUE, servers)


def event_ids() -> st.SearchStrategy[str]:
    """``$`` and 43 URL-safe base64 characters (room versions 4 and later)."""
    return _EVENT_ID_BODY.map(lambda body: f"${body}")


def event_types() -> st.SearchStrategy[str]:
    """Event types as real rooms carry them, message and state alike."""
    return st.sampled_from(MESSAGE_TYPES + STATE_TYPES)


@st.composite
def event_rows(
    draw: st.DrawFn,
    types: st.SearchStrategy[str] | None = None,
    *,
    room_id: str | None = None,
    server_name: str = "example.com",
) -> EventRow:
    """An ``events`` stream ``ev`` row whose fields agree with its type:
    state events have a state key (a user's ID for ``m.room.member``, with a
    membership), a redaction names what it redacts, a reaction what it
    relates to.  ``types`` chooses the types (default :func:`event_types`);
    ``st.just("m.room.message")`` gives messages only."""
    type_ = draw(types if types is not None else event_types())
    room = room_id if room_id is not None else draw(room_ids(server_name))
    state_key = None
    membership = None
    if type_ == "m.room.member":
        state_key = draw(user_ids(server_name))
        membership = draw(st.sampled_from(_MEMBERSHIPS))
    elif type_ in STATE_TYPES:
        state_key = ""
    redacts = draw(event_ids()) if type_ == "m.room.redaction" else None
    relates_to = draw(event_ids()) if type_ == "m.reaction" else None
    if type_ == "m.room.message" and draw(st.integers(0, 4)) == 0:
        relates_to = draw(event_ids())  # a reply or an edit
    return EventRow(
        draw(event_ids()),
        room,
        type_,
        state_key,
        redacts,
        relates_to,
        membership,
        False,
        False,
    )


# --- whole traffic scripts ---------------------------------------------------------------


def _rows_of(stream: str) -> st.SearchStrategy[Row]:
    return event_rows() if stream == "events" else rows_for(stream)


@st.composite
def traffic(
    draw: st.DrawFn,
    *,
    persisters: Sequence[str] = ("persister1", "persister2"),
    streams: Sequence[str] = ("events", "typing", "receipts", "to_device"),
    max_steps: int = 40,
    faults: bool = True,
) -> Traffic:
    """A script for a homeserver whose main process ``master`` writes every
    stream but ``events``, which ``persisters`` share (see
    :mod:`synrepl.testing.traffic`).  Writes come in batches of one to three
    rows, interleaved across writers; with ``faults``, some are never
    published or published twice, writers announce POSITIONs, Redis drops
    every connection, and time passes.  ``Traffic.play`` returns what a
    worker must get: every row once, in order."""
    writers = ("master", *persisters)
    step_kinds = ["write"] * 6 + (
        ["silent", "duplicate", "announce", "drop", "pause"] if faults else []
    )
    steps: list[Step] = []
    for _ in range(draw(st.integers(1, max_steps))):
        stream = draw(st.sampled_from(streams))
        writer = (
            draw(st.sampled_from(persisters)) if stream == "events" and persisters else "master"
        )
        kind = draw(st.sampled_from(step_kinds))
        if kind in ("write", "silent", "duplicate"):
            rows = tuple(draw(st.lists(_rows_of(stream), min_size=1, max_size=3)))
            steps.append(
                Write(
                    stream, writer, rows, published=kind != "silent", duplicated=kind == "duplicate"
                )
            )
        elif kind == "announce":
            steps.append(Announce(stream, writer))
        elif kind == "drop":
            steps.append(DropConnections())
        else:
            steps.append(Pause(draw(st.sampled_from((0.01, 0.5, 3.0, 30.0)))))
    return Traffic(writers, tuple(steps))
