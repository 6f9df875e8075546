"""Replication commands: one frozen class each, :func:`parse_line` and :func:`encode`.

A command travels as one Redis message: its ``NAME``, a space, then arguments
whose layout each class documents.  :func:`parse_line` is strict: anything it
cannot read raises a :class:`~synrepl.errors.ProtocolError` naming the
command, the reason and the line, and nothing else escapes it.  It also reads
the older dialects still met in the field (one-token ``POSITION`` from before
Synapse 1.22, ``USER_SYNC`` without a device from before 1.92).
:func:`encode` writes the current dialect unless asked otherwise, byte for
byte as Synapse does.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Collection
from typing import Any, ClassVar, TypeVar

import attrs
import orjson

from synrepl import _json
from synrepl._builders import builder, fast_constructor, field_names
from synrepl.errors import (
    EncodeError,
    MalformedCommandError,
    UnknownCommandError,
)
from synrepl.streams import AnyRow, RawRow, Row
from synrepl.streams._registry import FAST_ROW_PARSERS as _fast_row_parsers
from synrepl.streams._registry import ROW_PARSERS as _row_parsers
from synrepl.streams._row import generated_function

__all__ = (
    "Command",
    "TextCommand",
    "RdataCommand",
    "PositionCommand",
    "ReplicateCommand",
    "UserSyncCommand",
    "ClearUserSyncCommand",
    "FederationAckCommand",
    "UserIpCommand",
    "RemoteServerUpCommand",
    "LockReleasedCommand",
    "NewActiveTaskCommand",
    "CancelTaskCommand",
    "PingCommand",
    "ErrorCommand",
    "NameCommand",
    "ServerCommand",
    "COMMAND_TYPES",
    "Dialect",
    "parse_line",
    "SelectiveParser",
    "encode",
    "channel_for",
    "sender_of",
)


class Dialect(enum.Enum):
    """Which wire form :func:`encode` writes."""

    #: What Synapse 1.22+ (POSITION) and 1.92+ (USER_SYNC) read and write.
    CURRENT = "current"
    #: One-token POSITION and device-less USER_SYNC, for older peers.
    LEGACY = "legacy"


@attrs.frozen
class Command:
    """Base of all commands; ``NAME`` is the word that starts the line."""

    NAME: ClassVar[str]

    def channel(self, server_name: str) -> str:
        """The Redis channel this command is published on."""
        return server_name


@attrs.frozen
class TextCommand(Command):
    """A command whose only argument is the rest of the line."""

    #: Whether the argument may be empty (only PING and ERROR).
    ALLOW_EMPTY: ClassVar[bool] = False
    data: str


@attrs.frozen
class RdataCommand(Command):
    """``RDATA <stream> <instance> <token|batch> <row JSON>``: one stream row.

    ``token`` is None for ``batch``: the row belongs to the next numeric token
    this writer sends for the stream.
    """

    NAME: ClassVar[str] = "RDATA"
    stream_name: str
    instance_name: str
    token: int | None
    row: AnyRow


@attrs.frozen
class PositionCommand(Command):
    """``POSITION <stream> <instance> <prev_token> <new_token>``.

    The writer wrote nothing for the stream between the two tokens.
    """

    NAME: ClassVar[str] = "POSITION"
    stream_name: str
    instance_name: str
    prev_token: int
    new_token: int


@attrs.frozen
class ReplicateCommand(Command):
    """``REPLICATE``: ask every writer to announce its positions."""

    NAME: ClassVar[str] = "REPLICATE"


@attrs.frozen
class UserSyncCommand(Command):
    """``USER_SYNC <instance> <user> <device|None> <start|end> <last_sync_ms>``."""

    NAME: ClassVar[str] = "USER_SYNC"
    instance_id: str
    user_id: str
    device_id: str | None
    is_syncing: bool
    last_sync_ms: int


@attrs.frozen
class ClearUserSyncCommand(Command):
    """``CLEAR_USER_SYNC <instance>``: forget every sync this instance announced."""

    NAME: ClassVar[str] = "CLEAR_USER_SYNC"
    instance_id: str


@attrs.frozen
class FederationAckCommand(Command):
    """``FEDERATION_ACK <instance> <token>``: the sender handled the federation stream up to ``token``."""

    NAME: ClassVar[str] = "FEDERATION_ACK"
    instance_name: str
    token: int


def _redacted(_: object) -> str:
    return "'<redacted>'"


@attrs.frozen
class UserIpCommand(Command):
    """``USER_IP <user> <JSON [access_token, ip, user_agent, device_id, last_seen]>``.

    Published on ``<server_name>/USER_IP``.  The access token never shows in
    the repr.
    """

    NAME: ClassVar[str] = "USER_IP"
    user_id: str
    access_token: str = attrs.field(repr=_redacted)
    ip: str
    user_agent: str
    device_id: str | None
    last_seen: int

    def channel(self, server_name: str) -> str:
        return f"{server_name}/USER_IP"


@attrs.frozen
class RemoteServerUpCommand(TextCommand):
    """``REMOTE_SERVER_UP <server>``: a remote server answers again; reset its backoff."""

    NAME: ClassVar[str] = "REMOTE_SERVER_UP"


@attrs.frozen
class LockReleasedCommand(Command):
    """``LOCK_RELEASED <JSON [instance, lock_name, lock_key]>``."""

    NAME: ClassVar[str] = "LOCK_RELEASED"
    instance_name: str
    lock_name: str
    lock_key: str


@attrs.frozen
class NewActiveTaskCommand(TextCommand):
    """``NEW_ACTIVE_TASK <task_id>``: a scheduled task is ready to run."""

    NAME: ClassVar[str] = "NEW_ACTIVE_TASK"


@attrs.frozen
class CancelTaskCommand(TextCommand):
    """``CANCEL_TASK <task_id>``: stop a running scheduled task."""

    NAME: ClassVar[str] = "CANCEL_TASK"


@attrs.frozen
class PingCommand(TextCommand):
    """``PING <anything>``: keepalive, usually a millisecond timestamp."""

    NAME: ClassVar[str] = "PING"
    ALLOW_EMPTY: ClassVar[bool] = True


@attrs.frozen
class ErrorCommand(TextCommand):
    """``ERROR <message>``."""

    NAME: ClassVar[str] = "ERROR"
    ALLOW_EMPTY: ClassVar[bool] = True


@attrs.frozen
class NameCommand(TextCommand):
    """``NAME <name>``: TCP-era handshake, still understood."""

    NAME: ClassVar[str] = "NAME"


@attrs.frozen
class ServerCommand(TextCommand):
    """``SERVER <server_name>``: TCP-era handshake, still understood."""

    NAME: ClassVar[str] = "SERVER"


#: Every command class by its wire name.
COMMAND_TYPES: dict[str, type[Command]] = {
    cls.NAME: cls
    for cls in (
        ServerCommand,
        RdataCommand,
        PositionCommand,
        ErrorCommand,
        PingCommand,
        NameCommand,
        ReplicateCommand,
        UserSyncCommand,
        FederationAckCommand,
        UserIpCommand,
        RemoteServerUpCommand,
        ClearUserSyncCommand,
        LockReleasedCommand,
        NewActiveTaskCommand,
        CancelTaskCommand,
    )
}

# ---------------------------------------------------------------- construction

# Command classes are slotted frozen attrs classes: well under half the
# memory of a dict-backed instance.  Their frozen ``__setattr__`` rules out
# the interpreter's fast attribute store, so attrs' ``__init__`` writes each
# field through ``object.__setattr__``.  Two cheaper ways in, generated per
# class below (each under a file name of its own, for profiles):
#
# * ``__init__`` writes the slots through their member descriptors (what
#   users and encoders construct with; same signature as attrs').
# * The parsers, which have already checked every value (command classes
#   have no validators or converters to bypass), build through
#   :mod:`synrepl._builders`: about twice as cheap as the descriptors.

_C = TypeVar("_C", bound=Command)


def _install_init(cls: type[Command]) -> None:
    """Replace attrs' ``__init__`` with one that writes the slots through
    their descriptors (same signature and docstring)."""
    names = field_names(cls)
    if not names:
        return
    writers = {f"set_{name}": getattr(cls, name).__set__ for name in names}
    source = [f"def f(self, {', '.join(names)}):"]
    source += [f"    set_{name}(self, {name})" for name in names]
    filename = f"<synrepl.commands generated: {cls.__name__}.__init__>"
    init = generated_function(source, writers, filename, "f")
    init.__name__ = init.__qualname__ = "__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]


def _fast_constructor(cls: type[_C]) -> Callable[..., _C]:
    """``cls(*fields)`` for values already checked (see :mod:`synrepl._builders`)."""
    return fast_constructor(cls, "synrepl.commands")


for _cls in COMMAND_TYPES.values():
    _install_init(_cls)

# parse_line fills these three builders itself, saving a call per line:
# RDATA is half the traffic, POSITION and USER_SYNC the shortest lines.
_RdataBuilder = builder(RdataCommand)
_PositionBuilder = builder(PositionCommand)
_UserSyncBuilder = builder(UserSyncCommand)
_make_lock_released: Callable[[str, str, str], LockReleasedCommand] = _fast_constructor(
    LockReleasedCommand
)
_make_user_ip: Callable[[str, str, str, str, str | None, int], UserIpCommand] = _fast_constructor(
    UserIpCommand
)
_make_federation_ack: Callable[[str, int], FederationAckCommand] = _fast_constructor(
    FederationAckCommand
)
_make_clear_user_sync: Callable[[str], ClearUserSyncCommand] = _fast_constructor(
    ClearUserSyncCommand
)
_REPLICATE = ReplicateCommand()
_parse_fast_events = _fast_row_parsers["events"]
#: Stream name -> (the same name, once for all rows, and the stream's fast
#: parser): commands share the name instead of each holding its own copy.
_FAST_STREAMS: dict[str, tuple[str, Callable[[Any], Row | None]]] = {
    name: (name, parse) for name, parse in _fast_row_parsers.items()
}
_EVENTS = _FAST_STREAMS["events"][0]

# ---------------------------------------------------------------- parsing

# The parsers below are the library's hottest code: they avoid regexes and
# helper calls on the success path and check only what could go wrong.


class _Bad(Exception):
    """Internal: a parser's reason for refusing its arguments."""


def _int(text: str, what: str) -> int:
    """An ASCII decimal integer, as Synapse writes them (``int()`` alone would
    also take ``+5``, ``5_0``, spaces and non-ASCII digits)."""
    if text.isascii() and (text.isdigit() or (text[:1] == "-" and text[1:].isdigit())):
        return int(text)
    raise _Bad(f"{what} is not an integer: {text[:40]!r}")


def _word(text: str, what: str) -> str:
    if not text:
        raise _Bad(f"{what} is empty")
    if " " in text:
        raise _Bad(f"{what} contains a space: {text[:40]!r}")
    return text


_loads = _json.loads
_loads_fast = _json.loads_fast
_orjson_loads = orjson.loads


def _json_arg(text: str, what: str) -> Any:
    try:
        return _loads(text)
    except (ValueError, RecursionError) as e:
        raise _Bad(f"{what} is not valid JSON ({e})") from None


def _parse_replicate(args: str) -> ReplicateCommand:
    # Synapse sends "REPLICATE " and ignores arguments (the TCP era had some).
    # The command has no fields, so one instance serves every line.
    return _REPLICATE


def _parse_clear_user_sync(args: str) -> ClearUserSyncCommand:
    return _make_clear_user_sync(_word(args, "instance_id"))


def _parse_federation_ack(args: str) -> FederationAckCommand:
    parts = args.split(" ")
    if len(parts) != 2:
        raise _Bad("expected <instance> <token>")
    return _make_federation_ack(_word(parts[0], "instance_name"), _int(parts[1], "token"))


def _parse_user_ip(line: str, parts: list[str]) -> UserIpCommand:
    """``parts`` is the line split at its first four spaces."""
    if len(parts) < 3:
        raise _Bad("expected <user> <JSON array>")
    user = parts[1]
    if not user:  # split(" ") leaves no spaces inside
        raise _Bad("user_id is empty")
    # The JSON array may hold spaces (user agents do): the rest of the line.
    payload = parts[2] if len(parts) == 3 else line[9 + len(user) :]
    try:
        return _user_ip(user, _loads_fast(payload))
    except _Bad:  # a big last_seen read as a float? the exact decode decides
        return _user_ip(user, _json_arg(payload, "payload"))
    except (ValueError, RecursionError):
        return _user_ip(user, _json_arg(payload, "payload"))


def _user_ip(user: str, value: Any) -> UserIpCommand:
    if type(value) is not list or len(value) != 5:
        raise _Bad("payload must be [access_token, ip, user_agent, device_id, last_seen]")
    access_token, ip, user_agent, device_id, last_seen = value
    if not (type(access_token) is str and type(ip) is str and type(user_agent) is str):
        raise _Bad("access_token, ip and user_agent must be strings")
    if device_id is not None and type(device_id) is not str:
        raise _Bad("device_id must be a string or null")
    if type(last_seen) is not int:
        raise _Bad("last_seen must be an integer")
    return _make_user_ip(user, access_token, ip, user_agent, device_id, last_seen)


def _text_parser(cls: type[TextCommand]) -> Callable[[str], Command]:
    make = _fast_constructor(cls)
    allow_empty = cls.ALLOW_EMPTY

    def parse(args: str) -> Command:
        if not args and not allow_empty:
            raise _Bad("argument is empty")
        return make(args)

    return parse


#: Parsers of the arguments (the line after the name and its space) of the
#: commands that ``parse_line`` does not parse inline.
_PARSERS: dict[str, Callable[[str], Command]] = {
    "REPLICATE": _parse_replicate,
    "CLEAR_USER_SYNC": _parse_clear_user_sync,
    "FEDERATION_ACK": _parse_federation_ack,
    "REMOTE_SERVER_UP": _text_parser(RemoteServerUpCommand),
    "NEW_ACTIVE_TASK": _text_parser(NewActiveTaskCommand),
    "CANCEL_TASK": _text_parser(CancelTaskCommand),
    "NAME": _text_parser(NameCommand),
    "SERVER": _text_parser(ServerCommand),
    "PING": _text_parser(PingCommand),
    "ERROR": _text_parser(ErrorCommand),
}


def split_name(line: str) -> tuple[str, str]:
    """Split a line into its command name and the rest (no parsing)."""
    name, _, args = line.partition(" ")
    return name, args


def parse_line(line: str) -> Command:
    """Parse one message from the replication channel into a command.

    Raises:
        UnknownCommandError: the command name is not known (a newer Synapse?).
        MalformedCommandError: a known command whose arguments do not parse;
            :class:`~synrepl.errors.MalformedRowError` for an RDATA row that
            does not fit its stream's row type.
    """
    # One split serves RDATA (name, stream, instance, token, row JSON) and
    # POSITION whole, and the name of everything else.
    parts = line.split(" ", 4)
    name = parts[0]
    if "\n" in line:
        raise MalformedCommandError(name, "line contains a newline", line)
    try:
        if name == "RDATA":  # most traffic: parsed inline, see _parse_rdata_row
            try:  # cheaper than asking len(parts) first
                _, stream, instance, token_text, row_json = parts
            except ValueError:
                raise _Bad("expected <stream> <instance> <token> <row JSON>") from None
            if not stream or not instance:
                raise _Bad("stream and instance names must not be empty")
            if token_text == "batch":
                token = None
            elif token_text.isdigit() and token_text.isascii():
                token = int(token_text)
            else:
                token = _int(token_text, "token")
            # The fast path (see _parse_rdata_row), inlined: no calls but the
            # parser.  Half of all rows are the events stream's: a string
            # comparison finds its parser sooner than hashing the name.
            fast: Callable[[Any], Row | None] | None = None
            if stream == "events":
                stream, fast = _EVENTS, _parse_fast_events
            else:
                known = _FAST_STREAMS.get(stream)
                if known is not None:
                    stream, fast = known
            row: AnyRow | None = None
            if fast is not None:
                try:
                    row = fast(_orjson_loads(row_json))
                except ValueError:  # JSON that orjson refuses
                    pass
            if row is None:  # not vouched for, or a stream synrepl does not know
                row = _parse_rdata_row(stream, row_json)
            cmd = _RdataBuilder()  # see "construction"
            cmd.stream_name = stream
            cmd.instance_name = instance
            cmd.token = token
            cmd.row = row
            cmd.__class__ = RdataCommand
            rdata: RdataCommand = cmd
            return rdata
        # USER_SYNC and POSITION, inlined and asked for before LOCK_RELEASED:
        # the shortest lines, where every operation counts.
        if name == "USER_SYNC":
            try:
                _, instance, user, device_text, rest = parts
                state, last_sync = rest.split(" ")
            except ValueError:
                if len(parts) != 5 or " " in rest:
                    raise _Bad(
                        "expected <instance> <user> <device> <start|end> <last_sync_ms>"
                    ) from None
                # before Synapse 1.92: no device
                state, last_sync, device_text = device_text, rest, "None"
            if not instance or not user or not device_text:  # no spaces inside: split
                raise _Bad("instance_id, user_id and device_id must not be empty")
            if state == "start":
                is_syncing = True
            elif state == "end":
                is_syncing = False
            else:
                raise _Bad(f"state must be 'start' or 'end', not {state[:40]!r}")
            if last_sync.isdigit() and last_sync.isascii():
                last_sync_ms = int(last_sync)
            else:
                last_sync_ms = _int(last_sync, "last_sync_ms")
            cmd = _UserSyncBuilder()
            cmd.instance_id = instance
            cmd.user_id = user
            cmd.device_id = None if device_text == "None" else device_text
            cmd.is_syncing = is_syncing
            cmd.last_sync_ms = last_sync_ms
            cmd.__class__ = UserSyncCommand
            user_sync: UserSyncCommand = cmd
            return user_sync
        if name == "POSITION":
            try:
                _, stream, instance, prev_text, new_text = parts
            except ValueError:
                if len(parts) != 4:
                    raise _Bad("expected <stream> <instance> <prev_token> <new_token>") from None
                # before Synapse 1.22: one token, the current one
                _, stream, instance, new_text = parts
                prev_token = new_token = _int(new_text, "token")
            else:
                if " " in new_text:
                    raise _Bad("expected <stream> <instance> <prev_token> <new_token>")
                # One ASCII check for both tokens: a non-ASCII line (in its
                # names, say) takes the token-by-token checks instead.
                if prev_text.isdigit() and new_text.isdigit() and line.isascii():
                    prev_token = int(prev_text)
                    new_token = int(new_text)
                else:
                    prev_token = _int(prev_text, "prev_token")
                    new_token = _int(new_text, "new_token")
            if not stream:  # no spaces inside: split
                raise _Bad("stream name is empty")
            if not instance:
                raise _Bad("instance name is empty")
            cmd = _PositionBuilder()
            cmd.stream_name = stream
            cmd.instance_name = instance
            cmd.prev_token = prev_token
            cmd.new_token = new_token
            cmd.__class__ = PositionCommand
            position: PositionCommand = cmd
            return position
        if name == "LOCK_RELEASED":  # about as frequent as RDATA, with a margin to spare
            try:  # Synapse's JSON has no spaces: the line's second part
                _, args = parts
            except ValueError:  # spaces in the JSON, or nothing after the name
                args = line[14:]
            try:
                # Exact enough: a big integer read as a float fails the string
                # checks below just as the exact int would.
                value = _orjson_loads(args)
            except ValueError:
                value = _json_arg(args, "payload")
            if type(value) is list:
                try:
                    instance_name, lock_name, lock_key = value
                except ValueError:
                    pass
                else:
                    if (
                        type(instance_name) is str
                        and type(lock_name) is str
                        and type(lock_key) is str
                    ):
                        return _make_lock_released(instance_name, lock_name, lock_key)
            raise _Bad("payload must be a JSON array of 3 strings [instance, lock_name, lock_key]")
        if name == "USER_IP":
            return _parse_user_ip(line, parts)
        parser = _PARSERS.get(name)
        if parser is None:
            if not line.strip():
                raise MalformedCommandError("", "blank line", line)
            raise UnknownCommandError(name, line)
        return parser(line[len(name) + 1 :])
    except _Bad as e:
        raise MalformedCommandError(name, str(e), line) from None


def _parse_rdata_row(stream: str, row_json: str) -> AnyRow:
    """Decode and type one RDATA row exactly.

    ``parse_line`` first tries a fast path: orjson's answer taken as it
    comes, typed by the stream's fast parser (see ``FAST_ROW_PARSERS``).
    Whatever that parser cannot vouch for comes here: a type error that a big
    integer read as a float might explain, extra values, an unknown kind,
    free-form JSON holding floats or nested values, JSON that orjson refuses,
    and unknown streams.
    """
    try:
        raw = _loads(row_json)
    except (ValueError, RecursionError) as e:
        raise _Bad(f"row is not valid JSON ({e})") from None
    parse_known_row = _row_parsers.get(stream)
    return RawRow(stream, raw) if parse_known_row is None else parse_known_row(raw)


_STREAM_COMMANDS = ("RDATA", "POSITION")


class SelectiveParser:
    """A :func:`parse_line` that skips, undecoded, what the caller does not want.

    An observer that follows one stream need not pay for JSON-decoding and
    typing every other stream's rows: lines for other streams (RDATA and
    POSITION) and for unwanted command names return None after looking only
    at their first words.  Selected lines are parsed exactly as
    :func:`parse_line` would, errors included.

    Args:
        streams: stream names whose RDATA/POSITION to parse (None: all).
        commands: command names to parse (None: all).
    """

    def __init__(
        self,
        *,
        streams: Collection[str] | None = None,
        commands: Collection[str] | None = None,
    ) -> None:
        self._streams = None if streams is None else frozenset(streams)
        self._commands = None if commands is None else frozenset(commands)
        # The decision comes down to line prefixes, tested in one C call: a
        # line is selected when its name (the text up to the first space) is
        # wanted and, for RDATA/POSITION, so is its stream (the next word).
        # As prefixes: "NAME " or "NAME STREAM ", plus the lines that end
        # where such a prefix's space would be ("NAME", "NAME STREAM").
        # Names and streams with a space in them can never match a line.
        wanted: list[str] = []
        exact: set[str] = set()
        names = self._commands if self._commands is not None else _STREAM_COMMANDS
        for name in sorted(names):
            if " " in name:
                continue
            if self._streams is None or name not in _STREAM_COMMANDS:
                wanted.append(f"{name} ")
                exact.add(name)
                continue
            for stream in sorted(self._streams):
                if " " in stream:
                    continue
                wanted.append(f"{name} {stream} ")
                exact.add(f"{name} {stream}")
                if not stream:  # "NAME" and "NAME " have the empty stream
                    exact.add(name)
        if self._streams is None and self._commands is None:
            wanted = [""]  # everything
        #: Every line starting with one of these is selected (RDATA's first:
        #: the most frequent).
        self._wanted = tuple(sorted(wanted, key=lambda prefix: not prefix.startswith("RDATA ")))
        #: The selected lines that start with none of them.
        self._exact = frozenset(exact)
        #: Lines longer than this that start with no wanted prefix are skipped
        #: (unless every other command is wanted: then _rest decides).
        self._longest = max(map(len, exact), default=-1)
        # A cheaper first look when only named commands are wanted: every
        # selected line has one of a few characters at one position, and one
        # character is quicker to test than the prefixes (most lines go no
        # further).  The position: the first letter of an RDATA stream's
        # name if RDATA is wanted (RDATA is most of the traffic), else of the
        # command's name; none if a selected line could be that short.
        self._guard: frozenset[str] | None = None
        self._guard_at = 0
        if self._commands is None:
            self._longest = sys.maxsize
        elif wanted:
            selected = [*wanted, *exact]
            shortest = min(map(len, selected))
            if any(prefix.startswith("RDATA ") for prefix in wanted) and shortest > 6:
                self._guard_at = 6  # len("RDATA ")
            if shortest > self._guard_at:
                self._guard = frozenset(text[self._guard_at] for text in selected)

    def __call__(self, line: str) -> Command | None:
        if self._guard is not None:
            try:
                if line[self._guard_at] not in self._guard:
                    return None
            except IndexError:  # shorter than any selected line
                return None
        if line.startswith(self._wanted):
            return parse_line(line)
        if len(line) > self._longest:
            return None
        return self._rest(line)

    def _rest(self, line: str) -> Command | None:
        """The lines no prefix decides: short ones, and other commands' when
        every command is wanted (only RDATA/POSITION then need a stream)."""
        if (
            self._commands is None
            and not line.startswith(("RDATA ", "POSITION "))
            and line not in _STREAM_COMMANDS
        ):
            return parse_line(line)
        return parse_line(line) if line in self._exact else None


# ---------------------------------------------------------------- encoding


def _check_word(value: str, what: str) -> str:
    if not value or " " in value:
        raise EncodeError(f"{what} must be non-empty and contain no space: {value[:60]!r}")
    return value


def _dumps(value: Any, what: str) -> str:
    try:
        return _json.dumps(value)
    except (ValueError, TypeError) as e:
        raise EncodeError(f"{what} cannot be encoded as JSON: {e}") from None


def _args(cmd: Command, dialect: Dialect) -> str:
    if isinstance(cmd, RdataCommand):
        token = "batch" if cmd.token is None else str(cmd.token)
        return " ".join(
            (
                _check_word(cmd.stream_name, "stream_name"),
                _check_word(cmd.instance_name, "instance_name"),
                token,
                _dumps(cmd.row.to_raw(), "row"),
            )
        )
    if isinstance(cmd, PositionCommand):
        stream = _check_word(cmd.stream_name, "stream_name")
        instance = _check_word(cmd.instance_name, "instance_name")
        if dialect is Dialect.LEGACY:
            return f"{stream} {instance} {cmd.new_token}"
        return f"{stream} {instance} {cmd.prev_token} {cmd.new_token}"
    if isinstance(cmd, ReplicateCommand):
        return ""
    if isinstance(cmd, UserSyncCommand):
        words = [_check_word(cmd.instance_id, "instance_id"), _check_word(cmd.user_id, "user_id")]
        if dialect is Dialect.CURRENT:
            if cmd.device_id == "None":
                raise EncodeError("device_id 'None' would read back as no device")
            words.append(
                "None" if cmd.device_id is None else _check_word(cmd.device_id, "device_id")
            )
        words += ["start" if cmd.is_syncing else "end", str(cmd.last_sync_ms)]
        return " ".join(words)
    if isinstance(cmd, ClearUserSyncCommand):
        return _check_word(cmd.instance_id, "instance_id")
    if isinstance(cmd, FederationAckCommand):
        return f"{_check_word(cmd.instance_name, 'instance_name')} {cmd.token}"
    if isinstance(cmd, UserIpCommand):
        payload = [cmd.access_token, cmd.ip, cmd.user_agent, cmd.device_id, cmd.last_seen]
        return f"{_check_word(cmd.user_id, 'user_id')} {_dumps(payload, 'payload')}"
    if isinstance(cmd, LockReleasedCommand):
        return _dumps([cmd.instance_name, cmd.lock_name, cmd.lock_key], "payload")
    if isinstance(cmd, TextCommand):
        if not cmd.data and not cmd.ALLOW_EMPTY:
            raise EncodeError(f"{cmd.NAME} needs a non-empty argument")
        return cmd.data
    raise EncodeError(f"not a replication command: {type(cmd).__name__}")


def encode(cmd: Command, dialect: Dialect = Dialect.CURRENT) -> str:
    """The wire line for ``cmd`` (without the channel), as Synapse writes it.

    Raises:
        EncodeError: the command cannot be written so that it parses back the
            same: a newline anywhere, a space in a space-separated field, an
            empty name, or a value JSON cannot carry (NaN, Infinity, ...).
    """
    args = _args(cmd, dialect)  # refuses anything that is not a command
    line = f"{cmd.NAME} {args}"
    if "\n" in line:
        raise EncodeError(f"{cmd.NAME} command contains a newline")
    return line


def channel_for(cmd: Command, server_name: str) -> str:
    """The Redis channel ``cmd`` is published on for ``server_name``."""
    return cmd.channel(server_name)


def sender_of(cmd: Command) -> str | None:
    """The instance a command names as its sender (the writer of RDATA and
    POSITION), where it names one: a client knows its own echoes by it."""
    if isinstance(cmd, (RdataCommand, PositionCommand, FederationAckCommand, LockReleasedCommand)):
        return cmd.instance_name
    if isinstance(cmd, (UserSyncCommand, ClearUserSyncCommand)):
        return cmd.instance_id
    return None


#: Anything :func:`parse_line` can return.
AnyCommand = (
    RdataCommand
    | PositionCommand
    | ReplicateCommand
    | UserSyncCommand
    | ClearUserSyncCommand
    | FederationAckCommand
    | UserIpCommand
    | RemoteServerUpCommand
    | LockReleasedCommand
    | NewActiveTaskCommand
    | CancelTaskCommand
    | PingCommand
    | ErrorCommand
    | NameCommand
    | ServerCommand
)
