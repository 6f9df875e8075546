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
from collections.abc import Callable, Collection
from typing import Any, ClassVar

import attrs
import orjson

from synrepl import _json
from synrepl.errors import (
    EncodeError,
    MalformedCommandError,
    UnknownCommandError,
)
from synrepl.streams import AnyRow, RawRow
from synrepl.streams._registry import FAST_ROW_PARSERS as _fast_row_parsers
from synrepl.streams._registry import ROW_PARSERS as _row_parsers

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
)


class Dialect(enum.Enum):
    """Which wire form :func:`encode` writes."""

    #: What Synapse 1.22+ (POSITION) and 1.92+ (USER_SYNC) read and write.
    CURRENT = "current"
    #: One-token POSITION and device-less USER_SYNC, for older peers.
    LEGACY = "legacy"


@attrs.frozen(slots=False)
class Command:
    """Base of all commands; ``NAME`` is the word that starts the line."""

    NAME: ClassVar[str]

    def channel(self, server_name: str) -> str:
        """The Redis channel this command is published on."""
        return server_name


@attrs.frozen(slots=False)
class TextCommand(Command):
    """A command whose only argument is the rest of the line."""

    #: Whether the argument may be empty (only PING and ERROR).
    ALLOW_EMPTY: ClassVar[bool] = False
    data: str


@attrs.frozen(slots=False)
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


@attrs.frozen(slots=False)
class PositionCommand(Command):
    """``POSITION <stream> <instance> <prev_token> <new_token>``.

    The writer wrote nothing for the stream between the two tokens.
    """

    NAME: ClassVar[str] = "POSITION"
    stream_name: str
    instance_name: str
    prev_token: int
    new_token: int


@attrs.frozen(slots=False)
class ReplicateCommand(Command):
    """``REPLICATE``: ask every writer to announce its positions."""

    NAME: ClassVar[str] = "REPLICATE"


@attrs.frozen(slots=False)
class UserSyncCommand(Command):
    """``USER_SYNC <instance> <user> <device|None> <start|end> <last_sync_ms>``."""

    NAME: ClassVar[str] = "USER_SYNC"
    instance_id: str
    user_id: str
    device_id: str | None
    is_syncing: bool
    last_sync_ms: int


@attrs.frozen(slots=False)
class ClearUserSyncCommand(Command):
    """``CLEAR_USER_SYNC <instance>``: forget every sync this instance announced."""

    NAME: ClassVar[str] = "CLEAR_USER_SYNC"
    instance_id: str


@attrs.frozen(slots=False)
class FederationAckCommand(Command):
    """``FEDERATION_ACK <instance> <token>``: the sender handled the federation stream up to ``token``."""

    NAME: ClassVar[str] = "FEDERATION_ACK"
    instance_name: str
    token: int


def _redacted(_: object) -> str:
    return "'<redacted>'"


@attrs.frozen(slots=False)
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


@attrs.frozen(slots=False)
class RemoteServerUpCommand(TextCommand):
    """``REMOTE_SERVER_UP <server>``: a remote server answers again; reset its backoff."""

    NAME: ClassVar[str] = "REMOTE_SERVER_UP"


@attrs.frozen(slots=False)
class LockReleasedCommand(Command):
    """``LOCK_RELEASED <JSON [instance, lock_name, lock_key]>``."""

    NAME: ClassVar[str] = "LOCK_RELEASED"
    instance_name: str
    lock_name: str
    lock_key: str


@attrs.frozen(slots=False)
class NewActiveTaskCommand(TextCommand):
    """``NEW_ACTIVE_TASK <task_id>``: a scheduled task is ready to run."""

    NAME: ClassVar[str] = "NEW_ACTIVE_TASK"


@attrs.frozen(slots=False)
class CancelTaskCommand(TextCommand):
    """``CANCEL_TASK <task_id>``: stop a running scheduled task."""

    NAME: ClassVar[str] = "CANCEL_TASK"


@attrs.frozen(slots=False)
class PingCommand(TextCommand):
    """``PING <anything>``: keepalive, usually a millisecond timestamp."""

    NAME: ClassVar[str] = "PING"
    ALLOW_EMPTY: ClassVar[bool] = True


@attrs.frozen(slots=False)
class ErrorCommand(TextCommand):
    """``ERROR <message>``."""

    NAME: ClassVar[str] = "ERROR"
    ALLOW_EMPTY: ClassVar[bool] = True


@attrs.frozen(slots=False)
class NameCommand(TextCommand):
    """``NAME <name>``: TCP-era handshake, still understood."""

    NAME: ClassVar[str] = "NAME"


@attrs.frozen(slots=False)
class ServerCommand(TextCommand):
    """``SERVER <server_name>``: TCP-era handshake, still understood."""

    NAME: ClassVar[str] = "SERVER"


def _lean_init(cls: type[Command]) -> None:
    """Give a dict-backed frozen attrs class an ``__init__`` that only fills
    the instance dict: attrs' own also fetches a setattr helper that these
    classes never use, a measurable cost on the parse path."""
    names = [a.name for a in attrs.fields(cls)]
    if not names:
        return
    params = ", ".join(names)
    body = "\n".join(f"    d[{name!r}] = {name}" for name in names)
    namespace: dict[str, Any] = {}
    source = f"def __init__(self, {params}):\n    d = self.__dict__\n{body}"
    exec(source, namespace)  # noqa: S102 - built from our own field names
    namespace["__init__"].__doc__ = cls.__init__.__doc__
    cls.__init__ = namespace["__init__"]  # type: ignore[method-assign]


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

for _cls in COMMAND_TYPES.values():
    _lean_init(_cls)

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


def _parse_position(args: str) -> PositionCommand:
    parts = args.split(" ")
    if len(parts) == 4:
        stream, instance, prev_text, new_text = parts
        prev_token = _int(prev_text, "prev_token")
        new_token = _int(new_text, "new_token")
    elif len(parts) == 3:  # before Synapse 1.22: one token, the current one
        stream, instance, new_text = parts
        prev_token = new_token = _int(new_text, "token")
    else:
        raise _Bad("expected <stream> <instance> <prev_token> <new_token>")
    return PositionCommand(
        _word(stream, "stream name"), _word(instance, "instance name"), prev_token, new_token
    )


def _parse_replicate(args: str) -> ReplicateCommand:
    # Synapse sends "REPLICATE " and ignores arguments (the TCP era had some).
    return ReplicateCommand()


def _parse_user_sync(args: str) -> UserSyncCommand:
    parts = args.split(" ")
    if len(parts) == 5:
        instance, user, device_text, state, last_sync = parts
    elif len(parts) == 4:  # before Synapse 1.92: no device
        instance, user, state, last_sync = parts
        device_text = "None"
    else:
        raise _Bad("expected <instance> <user> <device> <start|end> <last_sync_ms>")
    if not instance or not user or not device_text:  # split(" ") leaves no spaces inside
        raise _Bad("instance_id, user_id and device_id must not be empty")
    if state != "start" and state != "end":
        raise _Bad(f"state must be 'start' or 'end', not {state[:40]!r}")
    if last_sync.isdigit() and last_sync.isascii():
        last_sync_ms = int(last_sync)
    else:
        last_sync_ms = _int(last_sync, "last_sync_ms")
    return UserSyncCommand(
        instance,
        user,
        None if device_text == "None" else device_text,
        state == "start",
        last_sync_ms,
    )


def _parse_clear_user_sync(args: str) -> ClearUserSyncCommand:
    return ClearUserSyncCommand(_word(args, "instance_id"))


def _parse_federation_ack(args: str) -> FederationAckCommand:
    parts = args.split(" ")
    if len(parts) != 2:
        raise _Bad("expected <instance> <token>")
    return FederationAckCommand(_word(parts[0], "instance_name"), _int(parts[1], "token"))


def _parse_user_ip(args: str) -> UserIpCommand:
    user, sep, payload = args.partition(" ")
    if not sep:
        raise _Bad("expected <user> <JSON array>")
    _word(user, "user_id")
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
    return UserIpCommand(user, access_token, ip, user_agent, device_id, last_seen)


def _text_parser(cls: type[TextCommand]) -> Callable[[str], Command]:
    def parse(args: str) -> Command:
        if not args and not cls.ALLOW_EMPTY:
            raise _Bad("argument is empty")
        return cls(args)

    return parse


_PARSERS: dict[str, Callable[[str], Command]] = {
    "POSITION": _parse_position,
    "REPLICATE": _parse_replicate,
    "USER_SYNC": _parse_user_sync,
    "CLEAR_USER_SYNC": _parse_clear_user_sync,
    "FEDERATION_ACK": _parse_federation_ack,
    "USER_IP": _parse_user_ip,
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
    name, _, args = line.partition(" ")
    if "\n" in line:
        raise MalformedCommandError(name, "line contains a newline", line)
    try:
        if name == "RDATA":  # most traffic: parsed inline, see _parse_rdata_row
            parts = args.split(" ", 3)
            if len(parts) != 4:
                raise _Bad("expected <stream> <instance> <token> <row JSON>")
            stream, instance, token_text, row_json = parts
            if not stream or not instance:
                raise _Bad("stream and instance names must not be empty")
            if token_text == "batch":
                token = None
            elif token_text.isdigit() and token_text.isascii():
                token = int(token_text)
            else:
                token = _int(token_text, "token")
            # The fast path (see _parse_rdata_row), inlined: no calls but the parser.
            fast = _fast_row_parsers.get(stream)
            if fast is not None:
                try:
                    row = fast(_orjson_loads(row_json))
                except ValueError:  # bad JSON or row, or a big int read as a float
                    row = None
                if row is not None:
                    return RdataCommand(stream, instance, token, row)
            return RdataCommand(stream, instance, token, _parse_rdata_row(stream, row_json))
        if name == "LOCK_RELEASED":  # about as frequent as RDATA: inlined too
            try:
                # Exact enough: a big integer read as a float fails the string
                # checks below just as the exact int would.
                value = _orjson_loads(args)
            except ValueError:
                value = _json_arg(args, "payload")
            if (
                type(value) is list
                and len(value) == 3
                and type(value[0]) is str
                and type(value[1]) is str
                and type(value[2]) is str
            ):
                return LockReleasedCommand(value[0], value[1], value[2])
            raise _Bad("payload must be a JSON array of 3 strings [instance, lock_name, lock_key]")
        parser = _PARSERS.get(name)
        if parser is None:
            if not line.strip():
                raise MalformedCommandError("", "blank line", line)
            raise UnknownCommandError(name, line)
        return parser(args)
    except _Bad as e:
        raise MalformedCommandError(name, str(e), line) from None


def _parse_rdata_row(stream: str, row_json: str) -> AnyRow:
    """Decode and type one RDATA row exactly.

    ``parse_line`` first tries a fast path for streams whose rows hold no
    free-form JSON: orjson's answer taken as it comes (see
    ``FAST_ROW_PARSERS``).  Whatever that path cannot vouch for comes here: a
    type error that a big integer read as a float might explain, extra values,
    an unknown kind, JSON that orjson refuses, and the free-form streams.
    """
    try:
        raw = _loads(row_json)
    except (ValueError, RecursionError) as e:
        raise _Bad(f"row is not valid JSON ({e})") from None
    parse_known_row = _row_parsers.get(stream)
    return RawRow(stream, raw) if parse_known_row is None else parse_known_row(raw)


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

    def __call__(self, line: str) -> Command | None:
        name, _, args = line.partition(" ")
        if self._commands is not None and name not in self._commands:
            return None
        if self._streams is not None and (name == "RDATA" or name == "POSITION"):
            stream = args.partition(" ")[0]
            if stream not in self._streams:
                return None
        return parse_line(line)


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
