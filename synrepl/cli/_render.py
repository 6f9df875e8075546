"""Turning commands and rows into output: JSON objects or aligned, coloured text.

One *record* (a dict) is made per command or row; ``--json`` prints it as
one line, otherwise it is laid out in columns.  The JSON shapes:

- rows: ``{"command": "RDATA", "stream", "writer", "token", "kind", "row",
  "fetched", "ts"}``; ``token`` is the token the row's batch belongs to,
  ``kind`` the events stream's sub-row kind (``ev``, ``state``,
  ``state-all``; null for other streams), ``row`` the row's fields by name,
  ``fetched`` true for rows fetched over HTTP;
- full events (``watch --full``): ``{"command": "EVENT", "stream", "writer",
  "token", "event", "missing", "fetched", "ts"}``; ``event`` holds every
  :class:`~synrepl.events.FullEvent` field, or is null and ``missing`` says
  which event had no content and why;
- ``POSITION``: ``stream``, ``writer``, ``prev_token``, ``new_token``;
- other commands: their fields by name (``instance`` for the sending
  instance), ``data`` for the one-argument commands;
- lines that do not parse: ``{"command": null, "error": ...}``.

Each record is one line of compact JSON, UTF-8 (:func:`json_line`: orjson,
the standard library for what orjson refuses).  When stdout is not a
terminal, :class:`Output` (given the reactor) holds lines and writes them
once the input that was ready has been handled, not one ``write`` per line.

``USER_IP`` access tokens are replaced by ``"<redacted>"`` unless asked.
In text, a full event is ``ROOM_ID SENDER: BODY`` for a message, and the
room, sender, type and content fields for anything else; what an event's
sender wrote is shown with control and other unprintable characters
escaped, so it can neither break the line nor drive the terminal.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import IO, Any

import attrs
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from synrepl.commands import (
    Command,
    PositionCommand,
    RdataCommand,
    ReplicateCommand,
    TextCommand,
    UserIpCommand,
    sender_of,
)
from synrepl.errors import MalformedCommandError, MalformedRowError, ProtocolError
from synrepl.errors import UnknownCommandError as _Unknown
from synrepl.events import EventFilter, FullEvent, MissingEvent
from synrepl.sharding import canonical_instance_name
from synrepl.streams import STREAM_NAMES, AllStateRow, AnyRow, CurrentStateRow, EventRow

__all__ = (
    "REDACTED",
    "Filters",
    "Output",
    "Stats",
    "FLUSH_DELAY",
    "MAX_HELD_LINES",
    "make_console",
    "command_record",
    "row_record",
    "event_record",
    "error_record",
    "json_line",
    "printable",
)

REDACTED = "<redacted>"

#: Attribute names that hold the sending instance, per command.
_SENDER_FIELDS = ("instance_id", "instance_name")

#: Colours per command name (text output).
_COMMAND_STYLES = {
    "RDATA": "green",
    "POSITION": "blue",
    "REPLICATE": "bright_blue",
    "USER_SYNC": "magenta",
    "CLEAR_USER_SYNC": "magenta",
    "USER_IP": "magenta",
    "FEDERATION_ACK": "cyan",
    "ERROR": "bold red",
    "EVENT": "bold green",
}

#: How the usual control characters are written by :func:`printable`.
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}

#: Message types shown without a ``[msgtype]`` tag before the body.
_PLAIN_MSGTYPES = frozenset({"m.text", "m.notice"})

#: Seconds from the first line buffered to its flush, when stdout is not a
#: terminal: 0 is the reactor's next turn, once it has handled the input that
#: was ready (Redis's replies are read 64 KiB at a time), so a busy channel is
#: written a few hundred lines per ``write`` and a quiet one line by line.
FLUSH_DELAY = 0.0

#: Lines held at most before they are written, whatever the reactor is doing.
MAX_HELD_LINES = 512


_STREAM_ORDER = {name: i for i, name in enumerate(STREAM_NAMES)}


def stream_order(stream: str) -> tuple[int, str]:
    """Sort key: Synapse's order of its streams, unknown ones after, by name."""
    return _STREAM_ORDER.get(stream, len(_STREAM_ORDER)), stream


def make_console(color: str, *, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A console for ``--color auto|always|never``; rich honours NO_COLOR itself.

    Lines are never wrapped (long rows stay one line, for grep).
    """
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    force = True if color == "always" else None
    no_color = True if color == "never" else None
    interactive = stream.isatty()
    return Console(
        file=stream,
        force_terminal=force,
        no_color=no_color,
        highlight=False,
        soft_wrap=True,
        emoji=False,
        markup=False,
        width=None if interactive else 10_000,
    )


@attrs.frozen
class Filters:
    """``--stream``, ``--command``, ``--writer``, and ``--room``/``--type``
    (``events``) for the events stream's rows: None lets everything through."""

    streams: frozenset[str] | None = None
    commands: frozenset[str] | None = None
    writers: frozenset[str] | None = None
    events: EventFilter | None = None

    @classmethod
    def of(
        cls,
        streams: Iterable[str] = (),
        commands: frozenset[str] | None = None,
        writers: Iterable[str] = (),
        events: EventFilter | None = None,
    ) -> Filters:
        s = frozenset(streams)
        w = frozenset(canonical_instance_name(x) for x in writers)
        return cls(s or None, commands, w or None, events)

    def wants(self, cmd: Command) -> bool:
        if self.commands is not None and cmd.NAME not in self.commands:
            return False
        if self.streams is not None:
            if not isinstance(cmd, RdataCommand | PositionCommand):
                return False
            if cmd.stream_name not in self.streams:
                return False
        return self.writers is None or sender_of(cmd) in self.writers

    def wants_rows(self, stream: str, writer: str) -> bool:
        if self.commands is not None and "RDATA" not in self.commands:
            return False
        if self.streams is not None and stream not in self.streams:
            return False
        return self.writers is None or writer in self.writers

    def wants_row(self, stream: str, row: AnyRow) -> bool:
        """The row filters (``events``) on one row of the events stream.

        What the row names decides, as the library's :class:`EventFilter`
        decides it before fetching anything: an ``ev`` row by its room and
        type, a ``state`` row by the room and type of the state entry, a
        ``state-all`` row (a room's whole state changed) by its room alone.
        A sender criterion cannot be decided here and lets the row through.
        """
        flt = self.events
        if flt is None or stream != "events":
            return True
        if isinstance(row, CurrentStateRow):
            row = EventRow(
                row.event_id or "", row.room_id, row.type, row.state_key,
                None, None, None, False, False,
            )  # fmt: skip
        if isinstance(row, EventRow):
            return flt.row_decides(row) is not False
        if isinstance(row, AllStateRow):
            return flt.rooms is None or row.room_id in flt.rooms
        return True


#: Per command class: (attribute, record key) of each field (the class's
#: fields, read once rather than per command).
_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {}


def _record_fields(cls: type) -> tuple[tuple[str, str], ...]:
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = tuple(
            (f.name, "instance" if f.name in _SENDER_FIELDS else f.name) for f in attrs.fields(cls)
        )
    return fields


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def row_record(
    stream: str,
    writer: str,
    token: int | None,
    row: AnyRow,
    *,
    fetched: bool = False,
    ts: float | None = None,
) -> dict[str, Any]:
    """The record of one stream row (``token`` None: its batch never completed)."""
    return {
        "command": "RDATA",
        "stream": stream,
        "writer": writer,
        "token": token,
        "kind": row.TYPE_ID,
        "row": row.as_dict(),
        "fetched": fetched,
        "ts": round(ts if ts is not None else time.time(), 3),
    }


def event_record(
    stream: str,
    writer: str,
    token: int,
    event: FullEvent | MissingEvent,
    *,
    fetched: bool = False,
    ts: float | None = None,
) -> dict[str, Any]:
    """The record of one full event (``watch --full``), or of one whose
    content the source did not have (``missing``)."""
    full = isinstance(event, FullEvent)
    fields = event.as_dict()
    return {
        "command": "EVENT",
        "stream": stream,
        "writer": writer,
        "token": token,
        "event": fields if full else None,
        "missing": None if full else fields,
        "fetched": fetched,
        "ts": round(ts if ts is not None else time.time(), 3),
    }


def command_record(
    cmd: Command, *, show_access_tokens: bool = False, ts: float | None = None
) -> dict[str, Any]:
    """The record of a command other than RDATA (use :func:`row_record` for rows)."""
    record: dict[str, Any] = {"command": cmd.NAME}
    if isinstance(cmd, PositionCommand):
        record.update(
            stream=cmd.stream_name,
            writer=cmd.instance_name,
            prev_token=cmd.prev_token,
            new_token=cmd.new_token,
        )
    elif isinstance(cmd, TextCommand):
        record["data"] = cmd.data
    elif not isinstance(cmd, ReplicateCommand):
        for attr, name in _record_fields(type(cmd)):
            value = getattr(cmd, attr)
            record[name] = _jsonable(value) if isinstance(value, tuple) else value
        if isinstance(cmd, UserIpCommand) and not show_access_tokens:
            record["access_token"] = REDACTED
    record["ts"] = round(ts if ts is not None else time.time(), 3)
    return record


def error_record(error: ProtocolError, channel: str, *, ts: float | None = None) -> dict[str, Any]:
    """The record of a line that does not parse; never quotes a USER_IP line."""
    secret_bearing = channel.endswith("/USER_IP")
    if isinstance(error, _Unknown):
        message = f"unknown command {error.name!r}"
    elif isinstance(error, MalformedCommandError):
        secret_bearing = secret_bearing or error.command == "USER_IP"
        message = f"malformed {error.command}: {error.reason}"
    elif isinstance(error, MalformedRowError):
        message = f"malformed {error.stream} row: {error.reason}"
    else:
        message = type(error).__name__
    if secret_bearing:
        message = message.split(", got", 1)[0]
    record: dict[str, Any] = {"command": None, "error": message, "channel": channel}
    record["ts"] = round(ts if ts is not None else time.time(), 3)
    return record


@attrs.define
class Stats:
    """What a command saw, for the summary printed on exit."""

    started: float = attrs.Factory(time.monotonic)
    lines: int = 0
    shown: int = 0
    bad_lines: int = 0
    unknown_commands: int = 0
    commands: Counter[str] = attrs.Factory(Counter)
    rows: Counter[tuple[str, str]] = attrs.Factory(Counter)
    fetched_rows: int = 0
    reconnects: int = 0
    gaps: int = 0

    def saw_command(self, cmd: Command) -> None:
        self.commands[cmd.NAME] += 1

    def saw_rows(self, stream: str, writer: str, count: int, *, fetched: bool = False) -> None:
        self.rows[(stream, writer)] += count
        if fetched:
            self.fetched_rows += count

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def printable(text: str) -> str:
    """``text`` with every character that is not printable (newlines, tabs,
    escape sequences, bidirectional controls, ...) written as an escape."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif char in _ESCAPES:
            out.append(_ESCAPES[char])
        else:
            code = ord(char)
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return "".join(out)


_orjson_dumps = orjson.dumps
_APPEND_NEWLINE = orjson.OPT_APPEND_NEWLINE
#: The standard library's encoders, for what orjson refuses: text output's,
#: JSON lines' (NaN refused, see _finite), and for lines with a lone surrogate.
_stdlib_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_line_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_ascii_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

#: Strings that a text field shows quoted, so they do not read as JSON's literals.
_LITERALS = frozenset({"null", "true"})


def json_line(record: Mapping[str, Any]) -> bytes:
    """``record`` as one line of JSON, UTF-8, newline included.

    orjson writes it (a tenth of the standard library's time); what orjson
    refuses and the wire can still bring (an integer beyond 64 bits, a lone
    surrogate, nesting deeper than 255) is written by the standard library,
    a lone surrogate as its ``\\udxxx`` escape, since UTF-8 cannot hold it.
    NaN and the infinities (an out-of-range float on the wire) come out as
    null: JSON has no literal for them.
    """
    try:
        return _orjson_dumps(record, option=_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError
        return _stdlib_json_line(record)


def _stdlib_json_line(record: Mapping[str, Any]) -> bytes:
    try:
        text = _line_encoder.encode(record)
    except ValueError:  # NaN or an infinity: null, as orjson writes them
        record = _finite(record)
        text = _line_encoder.encode(record)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate: only an escape can carry it
        return _ascii_encoder.encode(record).encode() + b"\n"


def _finite(value: Any) -> Any:
    """``value`` with NaN and the infinities replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_text(value: Any) -> str:
    """``value`` as compact JSON text (non-ASCII as is), for text output."""
    try:
        return _orjson_dumps(value).decode()
    except TypeError:
        return _stdlib_encoder.encode(value)


def _value_text(value: Any) -> str:
    """A field's value in text: a string as is unless empty, holding
    whitespace, or reading as a JSON literal; anything else as JSON."""
    # split() == [value]: no whitespace at all (str.isspace's), in one C call.
    if isinstance(value, str) and value.split(None, 1) == [value] and value not in _LITERALS:
        return value
    return _json_text(value)


def _write_all(stream: IO[bytes], data: bytes) -> None:
    """``stream.write(data)``, again with the rest after a short write (an
    unbuffered stream, ``PYTHONUNBUFFERED``, interrupted by a signal)."""
    view = memoryview(data)
    while view:
        written = stream.write(view)
        if written is None:  # a non-blocking stdout that is full: as a write error
            raise BlockingIOError("stdout is full")
        view = view[written:]


#: One line of text output: its pieces, each with its rich style ("" for none).
_Parts = list[tuple[str, str]]


class Output:
    """Prints records: JSON lines, or columns that line up (widening as needed).

    Each line is written and flushed at once when stdout is a terminal, or
    when no ``reactor`` is given.  Otherwise lines are held (at most
    :data:`MAX_HELD_LINES`) and written together once the reactor has handled
    the input that was ready (its next turn, see :data:`FLUSH_DELAY`), so a
    reader of a pipe gets every line promptly when traffic pauses, without
    one ``write`` per line while it flows.  Output holds them itself, so
    this does not depend on how stdout buffers (``PYTHONUNBUFFERED``);
    :meth:`flush` writes them out at once (before exit).

    A write to a closed pipe (``synrepl watch | head``) calls ``on_closed``
    once and drops everything after it.
    """

    def __init__(
        self,
        *,
        json_mode: bool,
        color: str = "auto",
        file: IO[str] | None = None,
        on_closed: Any = None,
        reactor: Any = None,
    ) -> None:
        self.json_mode = json_mode
        self._file = file if file is not None else sys.stdout
        self._console = make_console(color, file=self._file)
        # Start wide enough for the usual names, so columns rarely move.
        self._widths = {"command": 9, "stream": 12, "writer": 16, "token": 5, "kind": 5}
        self._on_closed = on_closed
        self.closed = False
        self._reactor = reactor
        self._flush_each = reactor is None or self._file.isatty()
        self._flush_call: Any = None
        self._held_json: list[bytes] = []
        self._held_text: list[str] = []
        # Under a UTF-8 text stream, lines go to its binary layer: JSON is never decoded.
        buffer = getattr(self._file, "buffer", None)
        encoding = str(getattr(self._file, "encoding", "") or "").lower().replace("-", "")
        self._bytes: IO[bytes] | None = buffer if encoding == "utf8" else None
        # Text output: the console's escape codes per style (None: plain text).
        self._styles: dict[str, tuple[str, str]] | None = (
            None if self._console.color_system is None else {"": ("", "")}
        )
        self._second = -1
        self._stamp = ""
        if self._bytes is not None:
            try:  # nothing written as text may come after what goes to the binary layer
                self._file.flush()
            except (BrokenPipeError, ValueError):
                self._close()

    def emit(self, record: Mapping[str, Any]) -> None:
        if self.closed:
            return
        try:
            if self.json_mode:
                self._held_json.append(json_line(record))
                held = len(self._held_json)
            else:
                parts = self._parts(record)
                text = self._render(parts)
                if text is None:  # characters rich strips or expands: rich writes it, as before
                    self._write_held()
                    self._console.print(Text.assemble(*parts))  # and flushes
                    return
                self._held_text.append(text)
                held = len(self._held_text)
            if self._flush_each or held >= MAX_HELD_LINES:
                self._write_held()
            elif self._flush_call is None:
                self._flush_call = self._reactor.callLater(FLUSH_DELAY, self._flush_later)
        except (BrokenPipeError, ValueError):
            self._close()

    def flush(self) -> None:
        """Write out the lines held, now (before exit, or before a batch
        counts as printed); a closed pipe is noticed here."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self.closed:
            return
        try:
            self._write_held()
        except (BrokenPipeError, ValueError):
            self._close()

    def _flush_later(self) -> None:
        self._flush_call = None
        self.flush()

    def _write_held(self) -> None:
        """Write and flush the lines held (raises what the write raises)."""
        if self._held_json:
            data = b"".join(self._held_json)
            self._held_json.clear()
            if self._bytes is not None:
                _write_all(self._bytes, data)
            else:
                self._file.write(data.decode())
        if self._held_text:
            text = "".join(self._held_text)
            self._held_text.clear()
            if self._bytes is not None:
                _write_all(self._bytes, text.encode())
            else:
                self._file.write(text)
        self._file.flush()

    def _close(self) -> None:
        self.closed = True
        try:  # nothing more can reach the reader; do not fail again on exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._file.fileno())
        except (OSError, ValueError):
            pass
        if self._on_closed is not None:
            self._on_closed()

    # --- text ------------------------------------------------------------------------

    def _render(self, parts: _Parts) -> str | None:
        """The line as the console would print it, or None when rich must print
        it itself: rich strips some control characters and expands tabs, and
        only printable text is sure to come out of it as it went in."""
        plain = "".join([text for text, _ in parts])
        if not plain.isprintable():
            return None
        styles = self._styles
        if styles is None:
            return plain + "\n"
        out: list[str] = []
        for text, style in parts:
            codes = styles.get(style)
            if codes is None:
                codes = styles[style] = self._style_codes(style)
            out += (codes[0], text, codes[1])
        out.append("\n")
        return "".join(out)

    def _style_codes(self, style: str) -> tuple[str, str]:
        """What the console writes before and after a piece of this style."""
        with self._console.capture() as capture:
            self._console.print(Text("\0", style=style), end="")
        before, _, after = capture.get().partition("\0")
        return before, after

    def _text(self, record: Mapping[str, Any]) -> Text:
        """The record's line as rich text."""
        return Text.assemble(*self._parts(record))

    def _cell(self, parts: _Parts, text: str, column: str, style: str = "") -> None:
        width = self._widths[column]
        if len(text) > width:
            width = self._widths[column] = len(text)
        parts.append((text.ljust(width) + " ", style))

    def _time(self, ts: float) -> str:
        second = int(ts)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%H:%M:%S", time.localtime(ts))
        return f"{self._stamp}.{int(ts * 1000) % 1000:03d} "

    def _parts(self, record: Mapping[str, Any]) -> _Parts:
        parts: _Parts = []
        ts = record.get("ts")
        if isinstance(ts, float | int):
            parts.append((self._time(ts), "dim"))
        name = record.get("command")
        if name is None:
            self._cell(parts, "BAD LINE", "command", "bold red")
            parts.append((str(record.get("error")), "red"))
            return parts
        self._cell(parts, str(name), "command", _COMMAND_STYLES.get(str(name), "yellow"))
        if name == "RDATA":
            token = record.get("token")
            self._cell(parts, str(record["stream"]), "stream", "cyan")
            self._cell(parts, str(record["writer"]), "writer", "yellow")
            self._cell(parts, "?" if token is None else str(token), "token", "bold")
            self._cell(parts, record.get("kind") or "", "kind", "dim")
            self._fields(parts, record["row"])
            if record.get("fetched"):
                parts.append((" (fetched)", "dim italic"))
            return parts
        if name == "EVENT":
            self._cell(parts, str(record["stream"]), "stream", "cyan")
            self._cell(parts, str(record["writer"]), "writer", "yellow")
            self._cell(parts, str(record["token"]), "token", "bold")
            self._event(parts, record)
            if record.get("fetched"):
                parts.append((" (fetched)", "dim italic"))
            return parts
        if name == "POSITION":
            self._cell(parts, str(record["stream"]), "stream", "cyan")
            self._cell(parts, str(record["writer"]), "writer", "yellow")
            parts.append((f"{record['prev_token']} -> {record['new_token']}", "bold"))
            return parts
        self._fields(parts, {k: v for k, v in record.items() if k not in ("command", "ts")})
        return parts

    @classmethod
    def _event(cls, parts: _Parts, record: Mapping[str, Any]) -> None:
        """``ROOM SENDER: BODY`` for a message; room, sender, type and content
        fields for other events; what is known of a missing one."""
        event = record.get("event")
        if event is None:
            missing = record.get("missing") or {}
            parts.append((printable(str(missing.get("room_id") or "?")) + " ", "cyan"))
            what = printable(str(missing.get("event_id")))
            if missing.get("type"):
                what += f" ({printable(str(missing['type']))})"
            reason = printable(str(missing.get("reason")))
            parts.append((f"no content for {what}: {reason}", "red"))
            return
        content: Mapping[str, Any] = event.get("content") or {}
        parts.append((printable(str(event["room_id"])) + " ", "cyan"))
        sender = printable(str(event["sender"]))
        kind = event["type"]
        if kind == "m.room.message" or kind == "m.room.encrypted":
            parts.append((sender + ":", "bold yellow"))
            body = content.get("body")
            msgtype = content.get("msgtype")
            if kind == "m.room.encrypted":
                parts.append((" (encrypted)", "dim"))
            elif event.get("redacted") or not content:
                parts.append((" (redacted)" if event.get("redacted") else " (no content)", "dim"))
            else:
                if isinstance(msgtype, str) and msgtype not in _PLAIN_MSGTYPES:
                    parts.append((f" [{printable(msgtype)}]", "dim"))
                text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
                parts.append((" " + printable(text), ""))
        else:
            parts.append((sender + " ", "bold yellow"))
            parts.append((printable(str(kind)), "magenta"))
            fields: dict[str, Any] = {}
            if event.get("state_key") is not None:
                fields["state_key"] = event["state_key"]
            if event.get("redacts"):
                fields["redacts"] = event["redacts"]
            fields.update(content)
            if fields:
                parts.append((" ", ""))
                cls._fields(parts, fields, escape=True)
            if event.get("redacted"):
                parts.append((" (redacted)", "dim"))
        if event.get("rejected"):
            reason = event.get("rejection_reason")
            parts.append(
                (f" (rejected: {printable(str(reason))})" if reason else " (rejected)", "red")
            )
        if event.get("outlier"):
            parts.append((" (outlier)", "dim"))

    @staticmethod
    def _fields(parts: _Parts, fields: Mapping[str, Any], *, escape: bool = False) -> None:
        first = True
        for key, value in fields.items():
            if value is None or value is False:
                continue
            if not first:
                parts.append((" ", ""))
            first = False
            text = _value_text(value)
            parts.append((f"{printable(key) if escape else key}=", "dim"))
            parts.append((printable(text) if escape else text, "red" if value == REDACTED else ""))


def print_summary(
    console: Console,
    title: str,
    stats: Stats,
    extra: Iterable[str] = (),
    *,
    unit: str = "lines",
    shown: bool = True,
) -> None:
    """The end-of-run summary: counts by command, and rows by stream and writer."""
    elapsed = stats.elapsed()
    head = Text(f"{title}: {stats.lines:,} {unit} in {elapsed:.1f} s", style="bold")
    details = [f"{stats.shown:,} shown"] if shown else []
    if stats.bad_lines or stats.unknown_commands:
        details.append(f"{stats.bad_lines:,} bad, {stats.unknown_commands:,} unknown")
    if stats.fetched_rows:
        details.append(f"{stats.fetched_rows:,} rows fetched over HTTP")
    if stats.reconnects:
        details.append(f"{stats.reconnects:,} reconnects")
    if stats.gaps:
        details.append(f"{stats.gaps:,} unfillable gaps")
    details.extend(extra)
    if details:
        head.append("; " + ", ".join(details))
    console.print(head)
    if stats.commands:
        counts = "  ".join(f"{name} {n:,}" for name, n in stats.commands.most_common())
        console.print(Text("  commands: " + counts))
    if stats.rows:
        table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 2, 0, 2))
        table.add_column("stream")
        table.add_column("writer")
        table.add_column("rows", justify="right")
        for (stream, writer), n in sorted(stats.rows.items()):
            table.add_row(stream, writer, f"{n:,}")
        console.print(table)
