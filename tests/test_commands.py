"""parse_line / encode: every command, both dialects, errors and channels."""

from __future__ import annotations

import copy
import inspect
import pickle
from collections.abc import Callable

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import synrepl
from synrepl import (
    ClearUserSyncCommand,
    Dialect,
    EncodeError,
    FederationAckCommand,
    LockReleasedCommand,
    MalformedCommandError,
    MalformedRowError,
    PingCommand,
    PositionCommand,
    ProtocolError,
    RdataCommand,
    ReplicateCommand,
    UnknownCommandError,
    UserIpCommand,
    UserSyncCommand,
    encode,
    parse_line,
)
from synrepl.streams import EventRow, PresenceRow, RawRow, TypingRow
from synrepl.testing import strategies as rs

EV_LINE = (
    'RDATA events master 1259 ["ev",["$e:x","!r:x","m.room.member","@a:x",null,null,"join",0,0]]'
)


def test_rdata_parses_to_a_typed_row() -> None:
    """An events RDATA line gives the inner ev row, with 0/1 read as booleans."""
    cmd = parse_line(EV_LINE)
    assert cmd == RdataCommand(
        "events",
        "master",
        1259,
        EventRow("$e:x", "!r:x", "m.room.member", "@a:x", None, None, "join", False, False),
    )


def test_batch_token_is_none() -> None:
    """The word ``batch`` in the token position parses to token None."""
    cmd = parse_line('RDATA typing master batch ["!r:x",["@a:x"]]')
    assert isinstance(cmd, RdataCommand)
    assert cmd.token is None
    assert cmd.row == TypingRow("!r:x", ("@a:x",))
    assert encode(cmd) == 'RDATA typing master batch ["!r:x",["@a:x"]]'


def test_unknown_stream_keeps_the_raw_row() -> None:
    """RDATA for a stream synrepl does not know still parses, raw, and re-encodes."""
    line = 'RDATA brand_new master 3 [1,{"a":[true]}]'
    cmd = parse_line(line)
    assert isinstance(cmd, RdataCommand)
    assert cmd.row == RawRow("brand_new", [1, {"a": [True]}])
    assert encode(cmd) == line


def test_extra_fields_are_kept() -> None:
    """A row longer than synrepl knows is typed, with the surplus in ``extras``."""
    line = 'RDATA presence master 7 ["@a:x","online",1,2,3,null,true,"new",4]'
    cmd = parse_line(line)
    assert isinstance(cmd, RdataCommand)
    assert cmd.row == PresenceRow("@a:x", "online", 1, 2, 3, None, True, extras=("new", 4))
    assert encode(cmd) == line


def test_replicate_is_written_with_a_trailing_space() -> None:
    """Synapse writes ``REPLICATE `` (name, space, no arguments); so do we."""
    assert encode(ReplicateCommand()) == "REPLICATE "
    assert parse_line("REPLICATE") == ReplicateCommand()
    assert parse_line("REPLICATE ") == ReplicateCommand()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("POSITION events master 5 9", PositionCommand("events", "master", 5, 9)),
        ("USER_SYNC w1 @a:x DEV start 17", UserSyncCommand("w1", "@a:x", "DEV", True, 17)),
        ("USER_SYNC w1 @a:x None end 17", UserSyncCommand("w1", "@a:x", None, False, 17)),
        ("CLEAR_USER_SYNC w1", ClearUserSyncCommand("w1")),
        ("FEDERATION_ACK fed1 42", FederationAckCommand("fed1", 42)),
        ('LOCK_RELEASED ["master","lock","key"]', LockReleasedCommand("master", "lock", "key")),
        ("PING 1700000000000", PingCommand("1700000000000")),
        (
            'USER_IP @a:x ["tok","10.0.0.1","agent",null,5]',
            UserIpCommand("@a:x", "tok", "10.0.0.1", "agent", None, 5),
        ),
    ],
)
def test_current_dialect_round_trips_byte_for_byte(line: str, expected: object) -> None:
    """Each command parses to its values and encodes back to the same line."""
    cmd = parse_line(line)
    assert cmd == expected
    assert encode(cmd) == line


def test_legacy_one_token_position() -> None:
    """Before 1.22 POSITION had one token: read as prev == new; write it on request."""
    cmd = parse_line("POSITION events master 12")
    assert cmd == PositionCommand("events", "master", 12, 12)
    assert encode(cmd) == "POSITION events master 12 12"
    assert encode(cmd, Dialect.LEGACY) == "POSITION events master 12"


def test_legacy_user_sync_without_device() -> None:
    """Before 1.92 USER_SYNC had no device: read as device None; write it on request."""
    cmd = parse_line("USER_SYNC w1 @a:x start 99")
    assert cmd == UserSyncCommand("w1", "@a:x", None, True, 99)
    assert encode(cmd) == "USER_SYNC w1 @a:x None start 99"
    assert encode(cmd, Dialect.LEGACY) == "USER_SYNC w1 @a:x start 99"


def test_user_ip_goes_to_its_own_channel() -> None:
    """USER_IP is published on <server_name>/USER_IP, everything else on <server_name>."""
    ip = UserIpCommand("@a:x", "secret", "1.2.3.4", "ua", "D", 1)
    assert ip.channel("example.com") == "example.com/USER_IP"
    assert synrepl.channel_for(ip, "example.com") == "example.com/USER_IP"
    assert ReplicateCommand().channel("example.com") == "example.com"


def test_user_ip_repr_hides_the_access_token() -> None:
    """The access token never shows in a repr (so never in logs)."""
    ip = UserIpCommand("@a:x", "syt_very_secret", "1.2.3.4", "ua", "D", 1)
    assert "syt_very_secret" not in repr(ip)
    assert "<redacted>" in repr(ip)
    assert "syt_very_secret" not in str(ip)


@pytest.mark.parametrize(
    ("line", "command", "reason"),
    [
        ("RDATA events master", "RDATA", "expected <stream>"),
        ("RDATA events master x5 []", "RDATA", "token is not an integer"),
        ("RDATA events master 5 [1,", "RDATA", "row is not valid JSON"),
        ("RDATA events master 5 NaN", "RDATA", "row is not valid JSON"),
        ("POSITION events master five 6", "POSITION", "prev_token is not an integer"),
        ("POSITION events", "POSITION", "expected <stream>"),
        ("USER_SYNC w1 @a:x D maybe 5", "USER_SYNC", "state must be"),
        ("USER_SYNC w1 @a:x D start", "USER_SYNC", "state must be"),
        ("FEDERATION_ACK fed1", "FEDERATION_ACK", "expected <instance> <token>"),
        ("USER_IP @a:x [1,2]", "USER_IP", "payload must be"),
        ("LOCK_RELEASED [1,2,3]", "LOCK_RELEASED", "3 strings"),
        ("CLEAR_USER_SYNC", "CLEAR_USER_SYNC", "instance_id is empty"),
        ("POSITION events master \u0665 6", "POSITION", "not an integer"),
    ],
)
def test_malformed_lines_name_command_reason_and_line(line: str, command: str, reason: str) -> None:
    """A bad line raises MalformedCommandError naming the command, the reason and the line."""
    with pytest.raises(MalformedCommandError) as info:
        parse_line(line)
    err = info.value
    assert err.command == command
    assert reason in err.reason
    assert err.line == line
    assert command in str(err) and line in str(err)


def test_bad_row_raises_a_row_error() -> None:
    """A row that does not fit its stream raises MalformedRowError (a ProtocolError)."""
    with pytest.raises(MalformedRowError) as info:
        parse_line('RDATA typing master 5 ["!r:x", "not a list"]')
    assert info.value.stream == "typing"
    assert "user_ids" in str(info.value)
    assert isinstance(info.value, ProtocolError)


def test_unknown_command_has_its_own_error() -> None:
    """An unknown command name raises UnknownCommandError, so callers can skip it."""
    with pytest.raises(UnknownCommandError) as info:
        parse_line("FUTURE_THING a b c")
    assert info.value.name == "FUTURE_THING"
    assert isinstance(info.value, ProtocolError)


def test_blank_line_is_a_protocol_error() -> None:
    """A blank message is not a command (callers skip blank lines first)."""
    with pytest.raises(MalformedCommandError):
        parse_line("   ")


def test_huge_lines_are_truncated_in_errors() -> None:
    """An error about a megabyte line carries a bounded excerpt, not the line."""
    line = "RDATA events master 5 [" + "1," * 500_000
    with pytest.raises(MalformedCommandError) as info:
        parse_line(line)
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize(
    ("cmd", "what"),
    [
        (PositionCommand("has space", "master", 1, 2), "stream_name"),
        (PositionCommand("events", "", 1, 2), "instance_name"),
        (PingCommand("a\nb"), "newline"),
        (ClearUserSyncCommand("two words"), "instance_id"),
        (UserSyncCommand("w1", "@a:x", "None", True, 1), "no device"),
        (
            RdataCommand("caches", "master", 1, RawRow("caches", float("nan"))),
            "cannot be encoded as JSON",
        ),
    ],
)
def test_encode_refuses_what_would_not_parse_back(cmd: synrepl.Command, what: str) -> None:
    """encode raises EncodeError rather than write a line that reads back differently."""
    with pytest.raises(EncodeError, match=what):
        encode(cmd)


def test_encode_refuses_non_commands() -> None:
    """Only replication command classes can be encoded."""
    with pytest.raises(EncodeError):
        encode(synrepl.Command())


@given(rs.commands(extras=True))
def test_encode_then_parse_is_identity(cmd: synrepl.Command) -> None:
    """For every command the strategies draw, parse_line(encode(cmd)) == cmd."""
    assert parse_line(encode(cmd)) == cmd


@given(rs.commands())
def test_legacy_dialect_still_parses(cmd: synrepl.Command) -> None:
    """Lines in the legacy dialect parse back to the command (what legacy can carry)."""
    parsed = parse_line(encode(cmd, Dialect.LEGACY))
    if isinstance(cmd, PositionCommand):
        assert parsed == PositionCommand(
            cmd.stream_name, cmd.instance_name, cmd.new_token, cmd.new_token
        )
    elif isinstance(cmd, UserSyncCommand):
        assert parsed == UserSyncCommand(
            cmd.instance_id, cmd.user_id, None, cmd.is_syncing, cmd.last_sync_ms
        )
    else:
        assert parsed == cmd


@given(st.sampled_from(sorted(synrepl.COMMAND_TYPES)))
def test_every_command_name_is_parseable(name: str) -> None:
    """Every known name either parses with no arguments or fails as a ProtocolError."""
    try:
        cmd = parse_line(name)
    except ProtocolError:
        return
    assert cmd.NAME == name


def test_selective_parser_skips_other_streams_undecoded() -> None:
    """Lines of unselected streams or commands return None without being decoded
    (even when their JSON is broken); selected lines parse like parse_line."""
    select = synrepl.SelectiveParser(streams={"typing"}, commands={"RDATA", "POSITION"})
    assert select("RDATA events master 5 {broken") is None
    assert select("POSITION events master 1 2") is None
    assert select('LOCK_RELEASED ["a","b","c"]') is None
    assert select("POSITION typing master 1 2") == PositionCommand("typing", "master", 1, 2)
    line = 'RDATA typing master 3 ["!r:x",[]]'
    assert select(line) == parse_line(line)
    with pytest.raises(MalformedRowError):
        select('RDATA typing master 3 ["!r:x"]')


def test_selective_parser_defaults_to_everything() -> None:
    """With no arguments SelectiveParser is parse_line."""
    select = synrepl.SelectiveParser()
    assert select('LOCK_RELEASED ["a","b","c"]') == LockReleasedCommand("a", "b", "c")


# ---------------------------------------------------------------- command objects

_ONE_OF_EACH = (
    EV_LINE,
    'RDATA typing master batch ["!r:x",["@a:x"]]',
    'RDATA brand_new master 3 [1,{"a":[true]}]',
    "POSITION events master 5 9",
    "POSITION events master 12",
    "REPLICATE ",
    "USER_SYNC w1 @a:x DEV start 17",
    "USER_SYNC w1 @a:x end 17",
    "CLEAR_USER_SYNC w1",
    "FEDERATION_ACK fed1 42",
    'USER_IP @a:x ["tok","10.0.0.1","agent 1.0 (x)",null,5]',
    "REMOTE_SERVER_UP other.example",
    'LOCK_RELEASED ["master","lock","key"]',
    "NEW_ACTIVE_TASK t1",
    "CANCEL_TASK t1",
    "PING 1700000000000",
    "ERROR oops",
    "NAME worker1",
    "SERVER example.com",
)


@pytest.mark.parametrize("line", _ONE_OF_EACH)
def test_parsed_commands_are_ordinary_frozen_slotted_instances(line: str) -> None:
    """What the parser builds (through its private constructors) is an instance
    of the public class like any other: same type, no instance dict, frozen,
    equal (and hashing equal) to the one the public constructor builds, with
    the same repr; attrs.evolve, copy and pickle work on it."""
    cmd = parse_line(line)
    cls = synrepl.COMMAND_TYPES[cmd.NAME]
    assert type(cmd) is cls
    assert not hasattr(cmd, "__dict__")
    fields = {f.name: getattr(cmd, f.name) for f in attrs.fields(cls)}
    twin = cls(**fields)
    assert cmd == twin and repr(cmd) == repr(twin)
    if not isinstance(cmd, RdataCommand) or isinstance(cmd.row, (EventRow, TypingRow)):
        assert hash(cmd) == hash(twin)  # (a raw row holding a list is unhashable)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(cmd, "extra", 1)  # noqa: B010 - any name, not only a field
    for name in fields:
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(cmd, name, None)
    assert copy.deepcopy(cmd) == cmd
    assert pickle.loads(pickle.dumps(cmd)) == cmd
    if fields:
        first = next(iter(fields))
        assert attrs.evolve(cmd, **{first: fields[first]}) == cmd


def test_command_fields_are_unchanged() -> None:
    """Public attribute names and constructor order, as documented."""
    assert [f.name for f in attrs.fields(RdataCommand)] == [
        "stream_name",
        "instance_name",
        "token",
        "row",
    ]
    assert [f.name for f in attrs.fields(UserIpCommand)] == [
        "user_id",
        "access_token",
        "ip",
        "user_agent",
        "device_id",
        "last_seen",
    ]
    assert list(inspect.signature(PositionCommand).parameters) == [
        "stream_name",
        "instance_name",
        "prev_token",
        "new_token",
    ]


def test_generated_command_code_has_its_own_file_names() -> None:
    """Generated ``__init__`` methods show up in profiles under their class."""
    for cls in synrepl.COMMAND_TYPES.values():
        if attrs.fields(cls):
            filename = cls.__init__.__code__.co_filename
            assert filename == f"<synrepl.commands generated: {cls.__name__}.__init__>"


# ---------------------------------------------------------------- SelectiveParser

_SELECTIONS: list[dict[str, set[str] | None]] = [
    {"streams": {"events"}, "commands": {"RDATA", "POSITION"}},
    {"streams": {"events"}, "commands": None},
    {"streams": None, "commands": {"LOCK_RELEASED", "RDATA"}},
    {"streams": {"typing", ""}, "commands": {"RDATA", "PING"}},
    {"streams": {""}, "commands": None},
    {"streams": {"a b"}, "commands": {"RDATA", "X Y", ""}},
    {"streams": set(), "commands": set()},
    {"streams": None, "commands": None},
    {"streams": {"e"}, "commands": {"RDATA"}},
    {"streams": None, "commands": {"USER_IP", "PING"}},
    {"streams": {"events"}, "commands": {"RDATA", ""}},
]

_EDGE_LINES = (
    "RDATA",
    "RDATA ",
    "RDATA  ",
    "RDATA typing",
    "RDATA typing ",
    "RDATA events",
    "RDATA e",
    "RDATA e 1",
    "RDATAe",
    "P",
    "PINGx",
    "USER_IP x",
    "POSITION",
    "POSITION ",
    "POSITION events",
    "POSITION events master 1 2",
    "RDATA events master 5 {broken",
    "RDATA a b c",
    'LOCK_RELEASED ["a","b","c"]',
    "PING",
    "PING ",
    "X Y z",
    "",
    " ",
    "RDATA\n",
    "RDATA events\nmaster 1 []",
)


def _reference(select: dict[str, set[str] | None], line: str) -> object:
    """The selection word by word, as documented: name, then stream."""
    name, _, args = line.partition(" ")
    commands, streams = select["commands"], select["streams"]
    if commands is not None and name not in commands:
        return None
    stream = args.partition(" ")[0]
    if streams is not None and name in ("RDATA", "POSITION") and stream not in streams:
        return None
    return parse_line(line)


def _outcome(parse: Callable[[], object]) -> object:
    try:
        return parse()
    except ProtocolError as e:
        return (type(e), str(e))


@given(
    st.sampled_from(_SELECTIONS),
    st.sampled_from(_EDGE_LINES) | rs.lines() | st.text(alphabet="RDATPOSIN evts\n[]1 "),
)
def test_selective_parser_selects_exactly_by_name_and_stream(
    select: dict[str, set[str] | None], line: str
) -> None:
    """Whatever the line and the selection, SelectiveParser returns what the
    word-by-word selection does: None, or parse_line's result or error."""
    parser = synrepl.SelectiveParser(streams=select["streams"], commands=select["commands"])
    assert _outcome(lambda: parser(line)) == _outcome(lambda: _reference(select, line))


def test_selective_parser_parses_malformed_lines_of_selected_streams() -> None:
    """A selected stream's line without arguments is still parsed (and refused)."""
    select = synrepl.SelectiveParser(streams={"typing"}, commands={"RDATA", "POSITION"})
    with pytest.raises(MalformedCommandError):
        select("RDATA typing")
    assert select("RDATA typings") is None


@given(rs.commands(extras=True))
def test_sender_of_is_the_field_naming_the_sending_instance(cmd: synrepl.commands.Command) -> None:
    """sender_of answers from the command's instance_name or instance_id
    field, for every command that has one, and None for the rest."""
    names = [
        getattr(cmd, f.name)
        for f in attrs.fields(type(cmd))
        if f.name in ("instance_name", "instance_id")
    ]
    assert synrepl.commands.sender_of(cmd) == (names[0] if names else None)
