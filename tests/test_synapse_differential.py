"""Differential tests: synrepl against the installed Synapse release itself.

Synapse is only imported here, at test time, as the reference implementation
of the wire protocol: its command registry, its ``to_line``/``from_line``
pairs and its streams' ``parse_row``.  Where the two differ on purpose, the
difference is named and pinned below (see ``_KNOWN_DIFFERENCES``).

synrepl's registries describe the newest release (:data:`synrepl.releases.NEWEST`);
an older one is compared with what :mod:`synrepl.releases` says it has: its
streams and commands, and its ``device_lists`` row shape.  Corpus lines
(captured from the newest release) and generated commands of a stream or
command the release lacks are left out, and ``device_lists`` rows take the
release's shape.

The room-sharding rule is compared with Synapse in ``tests/test_sharding.py``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import random
import re
from collections.abc import Iterator
from functools import cache
from typing import Any
from unittest import mock

import attrs
import pytest
from corpus_files import CORPUS_FILES, corpus_entries
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import synrepl
from synrepl import commands as c
from synrepl.errors import ProtocolError
from synrepl.releases import COMMANDS_SINCE, STREAMS_SINCE, SynapseRelease, facts_for
from synrepl.streams import (
    EVENTS_ROW_TYPES,
    ROW_TYPES,
    STREAM_NAMES,
    DeviceListsEntityRow,
    DeviceListsRow,
    EventRow,
    PushRulesRow,
    RawRow,
    Row,
)
from synrepl.testing import strategies as rs

synapse = pytest.importorskip("synapse")
_deps = pytest.importorskip("synapse.util.check_dependencies")

# Importing the replication modules pulls in ``synapse.app``, which exits the
# process when an optional dependency's version is off (txredisapi here).
# That check has nothing to do with the wire format, so it is silenced for the
# duration of the imports only.
with mock.patch.object(_deps, "check_requirements", lambda *args, **kwargs: None):
    syn_commands: Any = importlib.import_module("synapse.replication.tcp.commands")
    syn_streams: Any = importlib.import_module("synapse.replication.tcp.streams")
    syn_events: Any = importlib.import_module("synapse.replication.tcp.streams.events")

attr = pytest.importorskip("attr")  # Synapse's row classes use the attr namespace

STREAMS_MAP: dict[str, Any] = syn_streams.STREAMS_MAP
COMMAND_MAP: dict[str, Any] = syn_commands.COMMAND_MAP
parse_command_from_line = syn_commands.parse_command_from_line

SERVER_NAME = "example.com"

#: The installed release, and what synrepl.releases says it has.
INSTALLED = SynapseRelease.parse(importlib.metadata.version("matrix-synapse"))
FACTS = facts_for(INSTALLED)

#: synrepl's row type for the installed release's device_lists rows.
DEVICE_LISTS_ROW: type[Row] = next(
    t for t in (DeviceListsRow, DeviceListsEntityRow) if t.FIELDS == FACTS.device_lists_fields
)
#: The streams synrepl knows that the installed release has, in synrepl's order.
RELEASE_STREAMS = tuple(s for s in STREAM_NAMES if s in FACTS.streams)


# ---------------------------------------------------------------- helpers


def _synapse_params(syn_cls: type) -> tuple[str, ...]:
    """The constructor arguments of a Synapse command class, in order.

    Each is also the name of the attribute holding that value.
    """
    return tuple(inspect.signature(syn_cls).parameters)


def _our_params(cls: type[c.Command]) -> tuple[str, ...]:
    return tuple(a.name for a in attrs.fields(cls))


def _to_synapse(cmd: c.Command) -> Any:
    """The Synapse command object carrying the same values as ``cmd``.

    Field names are the same on both sides (pinned by
    ``test_command_fields_match_synapse``), so values are passed by name.  An
    RDATA row travels in Synapse's command as its raw JSON value.
    """
    syn_cls = COMMAND_MAP[cmd.NAME]
    if isinstance(cmd, c.RdataCommand):
        return syn_cls(cmd.stream_name, cmd.instance_name, cmd.token, cmd.row.to_raw())
    return syn_cls(*(getattr(cmd, name) for name in _synapse_params(syn_cls)))


def _synapse_line(syn_cmd: Any) -> str:
    # Exactly how Synapse's redis.py builds the message it publishes.
    return f"{syn_cmd.NAME} {syn_cmd.to_line()}"


def _same(a: Any, b: Any) -> bool:
    """Deep equality that also requires equal types (``1`` is not ``True``).

    The one normalisation: JSON arrays compare equal as lists or tuples,
    because synrepl stores them as tuples and Synapse as lists.
    """
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _field_matches(stream: str, name: str, annotation: str, theirs: Any, ours: Any) -> bool:
    """Whether a field of Synapse's parsed row carries synrepl's value.

    Normalisations, each a documented behaviour of one side:

    * synrepl turns the 0/1 that SQLite sends for booleans into ``bool``;
      Synapse's ``parse_row`` keeps the integer (``bool`` fields only).
    * Synapse turns ``profile_updates.affected_fields`` into a frozenset;
      synrepl keeps the wire order (and any duplicates) in a tuple.
    * synrepl turns JSON arrays into tuples; Synapse keeps lists (``_same``).
    """
    if stream == "profile_updates" and name == "affected_fields":
        if theirs is None or ours is None:
            return theirs is None and ours is None
        return isinstance(theirs, frozenset) and theirs == frozenset(ours)
    if annotation == "bool" and type(theirs) is int and theirs in (0, 1):
        theirs = theirs == 1
    return _same(theirs, ours)


def _assert_same_row(stream: str, theirs: Any, ours: Row) -> None:
    """Synapse's ``parse_row`` result and synrepl's typed row agree field by field."""
    if stream == "events":
        # Synapse wraps the kind-specific row in EventsStreamRow(type, data);
        # synrepl hands out the inner row and names the kind in TYPE_ID.
        assert type(theirs) is syn_events.EventsStreamRow
        assert theirs.type == ours.TYPE_ID
        theirs = theirs.data
    names = tuple(a.name for a in attr.fields(type(theirs)))
    assert names == ours.FIELDS
    # Synapse's parse_row passes the row as constructor arguments, so it can
    # only succeed on rows without values beyond the known fields.
    assert ours.extras == ()
    annotations = dict(zip(ours.FIELDS, ours.FIELD_TYPES, strict=True))
    for name in names:
        their_value, our_value = getattr(theirs, name), getattr(ours, name)
        assert _field_matches(stream, name, annotations[name], their_value, our_value), (
            f"{stream}.{name}: Synapse {their_value!r}, synrepl {our_value!r}"
        )


_NO_ROW = object()


def _synapse_parse(line: str) -> tuple[Any, Any]:
    """Parse a line the way a Synapse worker does: command, then the RDATA row.

    The second value is ``STREAMS_MAP[stream].parse_row(row)`` for RDATA on a
    stream Synapse knows (what ``ReplicationCommandHandler._process_rdata``
    does) and ``_NO_ROW`` otherwise.  Raises whatever Synapse raises.
    """
    syn_cmd = parse_command_from_line(line)
    row = _NO_ROW
    if syn_cmd.NAME == "RDATA" and syn_cmd.stream_name in STREAMS_MAP:
        row = STREAMS_MAP[syn_cmd.stream_name].parse_row(syn_cmd.row)
    return syn_cmd, row


def _assert_same_command(syn_cmd: Any, syn_row: Any, ours: c.Command) -> None:
    """Synapse's parsed command (and row) carry the same values as synrepl's."""
    assert syn_cmd.NAME == ours.NAME
    assert type(syn_cmd) is COMMAND_MAP[ours.NAME]
    if isinstance(ours, c.RdataCommand):
        assert syn_cmd.stream_name == ours.stream_name
        assert syn_cmd.instance_name == ours.instance_name
        assert _same(syn_cmd.token, ours.token)
        if isinstance(ours.row, RawRow):
            # An unknown stream: both sides keep the decoded JSON as it came.
            assert ours.row.stream == ours.stream_name
            assert ours.stream_name not in STREAMS_MAP
            assert _same(syn_cmd.row, ours.row.data)
        else:
            assert syn_row is not _NO_ROW
            _assert_same_row(ours.stream_name, syn_row, ours.row)
        return
    for name in _synapse_params(type(syn_cmd)):
        their_value, our_value = getattr(syn_cmd, name), getattr(ours, name)
        assert _same(their_value, our_value), (
            f"{ours.NAME}.{name}: Synapse {their_value!r}, synrepl {our_value!r}"
        )


def _synrepl_parse(line: str) -> c.Command | None:
    """synrepl's parse, or None when it refuses the line.

    Only :class:`ProtocolError` counts as a refusal: anything else escaping
    ``parse_line`` breaks its contract and fails the test.
    """
    try:
        return synrepl.parse_line(line)
    except ProtocolError:
        return None


# ---------------------------------------------------------------- the installed release


def _no_command(name: str) -> str | None:
    """Why the installed release has no command ``name`` (None: it has it)."""
    if name in FACTS.commands:
        return None
    return f"Synapse {INSTALLED} has no {name} command (from {COMMANDS_SINCE.get(name, '?')})"


def _no_stream(name: str) -> str | None:
    """Why the installed release has no stream ``name`` that synrepl types
    (None: it has it, or synrepl does not know the stream either)."""
    if name in FACTS.streams or name not in STREAM_NAMES:
        return None
    return f"Synapse {INSTALLED} has no {name} stream (from {STREAMS_SINCE.get(name, '?')})"


def _release_lacks(cmd: c.Command) -> str | None:
    """Why ``cmd`` means nothing to the installed release: a command or an
    RDATA stream of a newer release (None: it has both)."""
    reason = _no_command(cmd.NAME)
    if reason is None and isinstance(cmd, c.RdataCommand):
        reason = _no_stream(cmd.stream_name)
    return reason


def _other_device_lists_shape(cmd: c.Command) -> bool:
    """A device_lists row of the shape the installed release does not write
    (synrepl reads both, for a cluster in the middle of an upgrade)."""
    return (
        isinstance(cmd, c.RdataCommand)
        and isinstance(cmd.row, Row)
        and cmd.stream_name == "device_lists"
        and type(cmd.row) is not DEVICE_LISTS_ROW
    )


def _in_release(cmd: c.Command) -> bool:
    """Whether the installed release has the command (and RDATA stream)."""
    return _release_lacks(cmd) is None


def _release_shaped(cmd: c.Command) -> c.Command:
    """``cmd`` with a device_lists row in the installed release's shape
    (generated rows have the newest shape; the older one keeps their first
    fields, a user id for its entity and is_signature)."""
    if DEVICE_LISTS_ROW is DeviceListsEntityRow and _other_device_lists_shape(cmd):
        assert isinstance(cmd, c.RdataCommand) and isinstance(cmd.row, Row)
        values = cmd.row.values()[: len(DEVICE_LISTS_ROW.FIELDS)]
        return attrs.evolve(cmd, row=DEVICE_LISTS_ROW.from_values(values, cmd.row.extras))
    return cmd


def _corpus_line_skipped(line: str) -> bool:
    """A corpus line (of the newest release) the installed release could not
    have sent: its command or stream came later, or its device_lists row has
    the other shape.  (A line synrepl refuses is kept, to be reported.)"""
    ours = _synrepl_parse(line)
    return ours is not None and (
        _release_lacks(ours) is not None or _other_device_lists_shape(ours)
    )


# ---------------------------------------------------------------- corpus


@cache
def _corpus_lines(name: str) -> tuple[str, ...]:
    """The lines of one corpus file that the installed release could have sent."""
    return tuple(line for _, line in corpus_entries(name) if not _corpus_line_skipped(line))


def _shape(line: str) -> tuple[str, ...]:
    """A line's command, stream and (for events) row kind: its 'shape'."""
    name, _, args = line.partition(" ")
    parts = args.split(" ", 3)
    if name == "RDATA" and len(parts) == 4:
        return (name, parts[0], parts[3][:8])
    if name == "POSITION":
        return (name, parts[0])
    return (name,)


@cache
def _seed_lines() -> tuple[str, ...]:
    """Up to 15 corpus lines of every shape: varied seeds for mutation."""
    seeds: dict[tuple[str, ...], list[str]] = {}
    for name in CORPUS_FILES:
        for line in _corpus_lines(name):
            bucket = seeds.setdefault(_shape(line), [])
            if len(bucket) < 15 and line not in bucket:
                bucket.append(line)
    return tuple(line for bucket in seeds.values() for line in bucket)


# ---------------------------------------------------------------- streams


def test_stream_names_match_synapse() -> None:
    """Synapse registers exactly the streams synrepl.releases says the release
    has (all synrepl types, on the newest): none missing, none extra."""
    assert set(STREAMS_MAP) == FACTS.streams
    assert FACTS.streams <= set(STREAM_NAMES)
    assert len(STREAM_NAMES) == len(set(STREAM_NAMES))
    assert set(ROW_TYPES) == set(STREAM_NAMES) - {"events"}


def test_stream_names_in_synapse_order() -> None:
    """STREAM_NAMES lists the streams in STREAMS_MAP order, as its docstring says
    (on an older release: those it has)."""
    assert RELEASE_STREAMS == tuple(STREAMS_MAP)


@pytest.mark.parametrize("stream", sorted((set(STREAMS_MAP) | set(STREAM_NAMES)) - {"events"}))
def test_row_fields_match_synapse(stream: str) -> None:
    """A stream's row FIELDS are Synapse's ROW_TYPE attributes, in wire order
    (device_lists: the row type of the release's shape)."""
    if stream not in STREAMS_MAP and (reason := _no_stream(stream)) is not None:
        pytest.skip(reason)
    fields = tuple(a.name for a in attr.fields(STREAMS_MAP[stream].ROW_TYPE))
    row_type = DEVICE_LISTS_ROW if stream == "device_lists" else ROW_TYPES[stream]
    if stream == "device_lists":
        assert fields == FACTS.device_lists_fields
    assert row_type.FIELDS == fields
    assert row_type.STREAM == stream
    assert row_type.TYPE_ID is None


def test_events_row_kinds_match_synapse() -> None:
    """The events stream has Synapse's row kinds, each with Synapse's fields in order."""
    type_to_row = syn_events.TypeToRow
    assert set(EVENTS_ROW_TYPES) == set(type_to_row)
    for kind, row_type in EVENTS_ROW_TYPES.items():
        assert row_type.TYPE_ID == kind
        assert row_type.STREAM == "events"
        assert row_type.FIELDS == tuple(a.name for a in attr.fields(type_to_row[kind]))


# ---------------------------------------------------------------- commands

_EVENT_ROW = EventRow("$e", "!r:hs", "m.room.member", "@u:hs", None, None, "join", False, False)

#: One command of every kind, for the registry-level checks.
_SAMPLES: tuple[c.Command, ...] = (
    c.ServerCommand("hs"),
    c.RdataCommand("events", "master", 5, _EVENT_ROW),
    c.PositionCommand("events", "master", 4, 5),
    c.ErrorCommand("oops"),
    c.PingCommand("1700000000000"),
    c.NameCommand("worker1"),
    c.ReplicateCommand(),
    c.UserSyncCommand("worker1", "@u:hs", "DEV", True, 1700000000000),
    c.FederationAckCommand("fed1", 12),
    c.UserIpCommand("@u:hs", "syt_x", "::1", "curl", "DEV", 1700000000000),
    c.RemoteServerUpCommand("other.example"),
    c.ClearUserSyncCommand("worker1"),
    c.LockReleasedCommand("master", "lock", "key"),
    c.NewActiveTaskCommand("task1"),
    c.CancelTaskCommand("task1"),
)


def test_command_names_match_synapse() -> None:
    """Synapse has exactly the commands synrepl.releases says the release has
    (all synrepl knows, on the newest), each class under its NAME."""
    assert set(COMMAND_MAP) == FACTS.commands
    assert FACTS.commands <= set(c.COMMAND_TYPES)
    for name, cls in c.COMMAND_TYPES.items():
        assert cls.NAME == name
    assert {cmd.NAME for cmd in _SAMPLES} == set(c.COMMAND_TYPES)


@pytest.mark.parametrize("name", sorted(set(c.COMMAND_TYPES) | set(COMMAND_MAP)))
def test_command_fields_match_synapse(name: str) -> None:
    """A command's attrs fields are Synapse's constructor arguments, in order."""
    if name not in COMMAND_MAP and (reason := _no_command(name)) is not None:
        pytest.skip(reason)
    assert _our_params(c.COMMAND_TYPES[name]) == _synapse_params(COMMAND_MAP[name])


def _skip_unless_in_release(cmd: c.Command) -> None:
    reason = _release_lacks(cmd)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("cmd", _SAMPLES, ids=lambda cmd: cmd.NAME)
def test_channel_matches_synapse(cmd: c.Command) -> None:
    """Every command is published on the Redis channel Synapse publishes it on."""
    _skip_unless_in_release(cmd)
    expected = _to_synapse(cmd).redis_channel_name(SERVER_NAME)
    assert cmd.channel(SERVER_NAME) == expected
    assert c.channel_for(cmd, SERVER_NAME) == expected


@pytest.mark.parametrize("cmd", _SAMPLES, ids=lambda cmd: cmd.NAME)
def test_sample_lines_match_synapse(cmd: c.Command) -> None:
    """A hand-written command of every kind encodes and parses as Synapse does."""
    _skip_unless_in_release(cmd)
    syn_cmd = _to_synapse(cmd)
    assert synrepl.encode(cmd) == _synapse_line(syn_cmd)
    _assert_same_command(*_synapse_parse(synrepl.encode(cmd)), cmd)


# ---------------------------------------------------------------- generated commands


#: Generated commands of what the installed release has (all, on the newest).
_release_commands = rs.commands().filter(_in_release).map(_release_shaped)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmd=_release_commands)
def test_generated_commands_match_synapse(cmd: c.Command) -> None:
    """Any generated command: same line as Synapse, and each side reads the other's.

    * ``encode(cmd)`` equals Synapse's ``NAME + " " + to_line()`` of the
      equivalent Synapse command, and the channels agree;
    * Synapse's ``parse_command_from_line`` of synrepl's line carries the same
      values (the RDATA row as the exact JSON ``row.to_raw()`` gives), and its
      stream's ``parse_row`` agrees with synrepl's typed row;
    * ``synrepl.parse_line`` of Synapse's line gives back ``cmd``.
    """
    syn_cmd = _to_synapse(cmd)
    synapse_line = _synapse_line(syn_cmd)
    assert synrepl.encode(cmd) == synapse_line
    assert cmd.channel(SERVER_NAME) == syn_cmd.redis_channel_name(SERVER_NAME)

    parsed, syn_row = _synapse_parse(synrepl.encode(cmd))
    _assert_same_command(parsed, syn_row, cmd)
    for name in _synapse_params(type(syn_cmd)):
        assert _same(getattr(parsed, name), getattr(syn_cmd, name))
    if isinstance(cmd, c.RdataCommand):
        assert _same(parsed.row, cmd.row.to_raw())

    assert synrepl.parse_line(synapse_line) == cmd


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmd=rs.rdata_commands(st.sampled_from(RELEASE_STREAMS)).map(_release_shaped))
def test_generated_rows_match_synapse_parse_row(cmd: c.RdataCommand) -> None:
    """Rows of every known stream (the release has): Synapse's parse_row reads
    the same fields.

    (``test_generated_commands_match_synapse`` draws unknown streams too; this
    one spends all its examples on typed rows.)
    """
    assert isinstance(cmd.row, Row)
    syn_row = STREAMS_MAP[cmd.stream_name].parse_row(cmd.row.to_raw())
    _assert_same_row(cmd.stream_name, syn_row, cmd.row)


# ---------------------------------------------------------------- real lines


def _corpus_mismatches(lines: tuple[str, ...]) -> Iterator[str]:
    for number, line in enumerate(lines, 1):
        try:
            syn_cmd, syn_row = _synapse_parse(line)
            ours = synrepl.parse_line(line)
            _assert_same_command(syn_cmd, syn_row, ours)
        except Exception as e:  # noqa: BLE001 - report every kind of failure, with its line
            yield f"line {number}: {type(e).__name__}: {e}: {line[:200]!r}"


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_corpus_lines_match_synapse(name: str) -> None:
    """Every line Synapse published in the corpus parses to the same values on both sides.

    RDATA rows are compared through each side's ``parse_row`` with the
    normalisations of ``_field_matches``.  On an older release, the lines it
    could not have sent are left out (``_corpus_line_skipped``).
    """
    lines = _corpus_lines(name)
    assert lines
    mismatches = []
    for mismatch in _corpus_mismatches(lines):
        mismatches.append(mismatch)
        if len(mismatches) == 10:
            break
    assert not mismatches, "\n".join(mismatches)


# ---------------------------------------------------------------- malformed input

#: A device_lists row of the shape the installed release does not write.
_OTHER_DEVICE_LISTS_ROW = (
    DeviceListsRow("@u:hs", False, True)
    if DEVICE_LISTS_ROW is DeviceListsEntityRow
    else DeviceListsEntityRow("@u:hs", False)
)

#: Lines on which the two sides differ on purpose: (line, synrepl's result or
#: None for a refusal, whether the installed Synapse accepts it, why).  Each
#: release of the matrix gives the same verdicts.
_KNOWN_DIFFERENCES: tuple[tuple[str, c.Command | None, bool, str], ...] = (
    # synrepl accepts, Synapse refuses.
    (
        "POSITION events master 5",
        c.PositionCommand("events", "master", 5, 5),
        False,
        "one-token POSITION of Synapse < 1.22",
    ),
    (
        "USER_SYNC worker1 @u:hs start 1700",
        c.UserSyncCommand("worker1", "@u:hs", None, True, 1700),
        False,
        "device-less USER_SYNC of Synapse < 1.92",
    ),
    (
        'RDATA push_rules master 5 ["@u:hs","new"]',
        c.RdataCommand("push_rules", "master", 5, PushRulesRow("@u:hs", extras=("new",))),
        False,
        "values past the known fields are kept as extras (a newer Synapse's row)",
    ),
    (
        'RDATA events master 5 ["new-kind",["!r:hs"]]',
        c.RdataCommand("events", "master", 5, RawRow("events", ["new-kind", ["!r:hs"]])),
        False,
        "an unknown events row kind becomes a RawRow (Synapse: KeyError)",
    ),
    (
        c.encode(c.RdataCommand("device_lists", "master", 5, _OTHER_DEVICE_LISTS_ROW)),
        c.RdataCommand("device_lists", "master", 5, _OTHER_DEVICE_LISTS_ROW),
        False,
        "a device_lists row of the other releases' shape (synrepl reads both)",
    ),
    # Synapse accepts, synrepl refuses: synrepl checks what Synapse trusts.
    ("POSITION events master 4 5 ", None, True, "trailing space: Synapse's int() strips"),
    ("POSITION events master +4 5", None, True, "int() accepts a sign"),
    ("POSITION events master 4 1_000", None, True, "int() accepts underscores"),
    ("POSITION events master \u0664 5", None, True, "int() accepts non-ASCII digits"),
    ("POSITION events master 4\t 5", None, True, "int() strips other whitespace"),
    ("USER_SYNC worker1 @u:hs DEV start 1700 ", None, True, "trailing space after the time"),
    ("USER_SYNC worker1 @u:hs  start 1700", None, True, "empty device id"),
    ("FEDERATION_ACK  5", None, True, "empty instance name"),
    ('RDATA push_rules  5 ["@u:hs"]', None, True, "empty RDATA instance name"),
    ("CLEAR_USER_SYNC", None, True, "empty instance id"),
    ("CLEAR_USER_SYNC worker 1", None, True, "instance id with a space (encode refuses it too)"),
    ("POSITION events  4 5", None, True, "empty POSITION instance name"),
    ("SERVER", None, True, "empty SERVER / NAME / REMOTE_SERVER_UP / task id"),
    ("USER_IP @u:hs [1,2,3,4,5]", None, True, "Synapse does not type-check USER_IP"),
    ('LOCK_RELEASED "abc"', None, True, "Synapse unpacks any 3-item iterable"),
    ('LOCK_RELEASED {"a":1,"b":2,"c":3}', None, True, "... even a dict's keys"),
    ('RDATA push_rules master 5 "a"', None, True, "Synapse splats a string into the row"),
    ('RDATA push_rules master 5 {"a":1}', None, True, "... or a dict's keys"),
    ('RDATA events master 5 ["state-all","x"]', None, True, "... also inside events rows"),
    ('RDATA pushers master 5 ["@u:hs","a","k",2]', None, True, "Synapse keeps any 'bool'"),
    ("RDATA to_device master 5 [7]", None, True, "Synapse does not type-check row fields"),
)


@pytest.mark.parametrize(
    ("line", "ours", "synapse_accepts", "why"),
    _KNOWN_DIFFERENCES,
    ids=[why for *_, why in _KNOWN_DIFFERENCES],
)
def test_known_differences(
    line: str, ours: c.Command | None, synapse_accepts: bool, why: str
) -> None:
    """Pins every known, intentional difference between synrepl and the installed Synapse."""
    assert _synrepl_parse(line) == ours
    try:
        _synapse_parse(line)
    except Exception:  # noqa: BLE001 - Synapse refuses lines with any exception
        accepted = False
    else:
        accepted = True
    assert accepted == synapse_accepts


def _known_difference(line: str, ours: c.Command) -> str | None:
    """Why synrepl may accept ``line`` although the installed Synapse refuses it."""
    args = line.partition(" ")[2]
    if isinstance(ours, c.PositionCommand) and len(args.split(" ")) == 3:
        return "one-token POSITION"
    if isinstance(ours, c.UserSyncCommand) and len(args.split(" ")) == 4:
        return "device-less USER_SYNC"
    if isinstance(ours, c.RdataCommand):
        if isinstance(ours.row, Row) and ours.row.extras:
            return "row extras"
        if isinstance(ours.row, RawRow) and ours.stream_name == "events":
            return "unknown events row kind"
        if _other_device_lists_shape(ours):
            return "device_lists row of the other shape"
    return None


_REPLACEMENT_CHARS = ' 0123456789-+_[]{}",:.\\aeflnrstu\t\r\x00\u0664\u00e9\U0001f600'
#: A JSON number, literal or string inside a line.
_JSON_SCALAR = re.compile(
    r'-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null|"(?:[^"\\]|\\.)*"'
)
_JSON_REPLACEMENTS = (
    *("0", "1", "2", "-1", "1.5", "1e400", "9" * 25, "true", "false", "null"),
    *('"x"', '""', '"None"', "[]", "{}", '["x"]', '[1,"x"]', "NaN"),
    # one value more or fewer in the array around it
    *('"x",1', "null,null", ""),
)


def _mutate(line: str, rnd: random.Random) -> str:
    mutation = rnd.choice(("truncate", "drop", "duplicate", "replace", "insert", "json", "json"))
    if mutation in ("drop", "duplicate"):
        tokens = line.split(" ")
        i = rnd.randrange(len(tokens))
        tokens[i : i + 1] = [] if mutation == "drop" else [tokens[i], tokens[i]]
        return " ".join(tokens)
    if mutation == "json":
        scalars = list(_JSON_SCALAR.finditer(line))
        if scalars:
            m = rnd.choice(scalars)
            replacement = rnd.choice(_JSON_REPLACEMENTS)
            start, end = m.start(), m.end()
            if not replacement and line[end : end + 1] == ",":
                end += 1  # drop the value and its comma
            return line[:start] + replacement + line[end:]
    i = rnd.randrange(len(line) + 1)
    if mutation == "truncate":
        return line[:i]
    if rnd.random() < 0.7:
        char = rnd.choice(_REPLACEMENT_CHARS)
    else:  # any code point but a lone surrogate (Redis hands over decoded UTF-8)
        char = chr(rnd.choice((rnd.randrange(0xD800), rnd.randrange(0xE000, 0x110000))))
    if mutation == "replace":
        return line[:i] + char + line[i + 1 :]
    return line[:i] + char + line[i:]


#: Valid lines of what the installed release has (rs.lines(), on the newest).
_release_lines = _release_commands.map(c.encode)


@st.composite
def _mutated_lines(draw: st.DrawFn) -> str:
    """A corpus (or generated) line with one to three small corruptions.

    Positions come from a Hypothesis-controlled Random so that they spread
    over the whole line (drawn integers favour the ends).
    """
    line = draw(st.deferred(lambda: st.sampled_from(_seed_lines())) | _release_lines)
    rnd = draw(st.randoms(use_true_random=False))
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        line = _mutate(line, rnd)
    return line


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=_mutated_lines())
def test_mutated_lines_synrepl_is_no_laxer_than_synapse(line: str) -> None:
    """Corrupted lines: synrepl accepts only what Synapse accepts, with the same values.

    Whenever ``synrepl.parse_line`` succeeds, Synapse's parser (and, for
    RDATA on a known stream, its ``parse_row``) succeeds too and carries the
    same values, unless the line is one of the intentional differences of
    ``_known_difference``.  synrepl refusing what Synapse accepts is allowed:
    synrepl checks types that Synapse trusts (see ``_KNOWN_DIFFERENCES``).
    A command or stream the installed release lacks has nothing to compare.
    """
    ours = _synrepl_parse(line)
    if ours is None or not _in_release(ours):
        return
    try:
        syn_cmd, syn_row = _synapse_parse(line)
    except Exception as e:  # noqa: BLE001 - Synapse refuses lines with any exception
        reason = _known_difference(line, ours)
        assert reason is not None, (
            f"synrepl accepts {line!r} as {ours!r}; Synapse raises {type(e).__name__}: {e}"
        )
        return
    _assert_same_command(syn_cmd, syn_row, ours)
