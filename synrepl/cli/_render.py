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

``USER_IP`` access tokens are replaced by ``"<redacted>"`` unless asked.
In text, a full event is ``ROOM_ID SENDER: BODY`` for a message, and the
room, sender, type and content fields for anything else; what an event's
sender wrote is shown with control and other unprintable characters
escaped, so it can neither break the line nor drive the terminal.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import IO, Any

import attrs
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
)
from synrepl.errors import MalformedCommandError, MalformedRowError, ProtocolError
from synrepl.errors import UnknownCommandError as _Unknown
from synrepl.events import EventFilter, FullEvent, MissingEvent, thaw
from synrepl.sharding import canonical_instance_name
from synrepl.streams import AllStateRow, AnyRow, CurrentStateRow, EventRow

__all__ = (
    "REDACTED",
    "Filters",
    "Output",
    "Stats",
    "make_console",
    "command_record",
    "row_record",
    "event_record",
    "error_record",
    "sender_of",
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


def sender_of(cmd: Command) -> str | None:
    """The instance a command comes from, where it names one."""
    if isinstance(cmd, RdataCommand | PositionCommand):
        return cmd.instance_name
    for name in _SENDER_FIELDS:
        value = getattr(cmd, name, None)
        if isinstance(value, str):
            return value
    return None


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
    fields = {f.name: thaw(getattr(event, f.name)) for f in attrs.fields(type(event))}
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
        for field in attrs.fields(type(cmd)):
            name = "instance" if field.name in _SENDER_FIELDS else field.name
            record[name] = _jsonable(getattr(cmd, field.name))
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


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        if value and not any(c.isspace() for c in value) and value not in ("null", "true"):
            return value
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Output:
    """Prints records: JSON lines, or columns that line up (widening as needed).

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
    ) -> None:
        self.json_mode = json_mode
        self._file = file if file is not None else sys.stdout
        self._console = make_console(color, file=self._file)
        # Start wide enough for the usual names, so columns rarely move.
        self._widths = {"command": 9, "stream": 12, "writer": 16, "token": 5, "kind": 5}
        self._on_closed = on_closed
        self.closed = False

    def emit(self, record: Mapping[str, Any]) -> None:
        if self.closed:
            return
        try:
            if self.json_mode:
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
                self._file.flush()
            else:
                self._console.print(self._text(record))
                self._file.flush()
        except (BrokenPipeError, ValueError):
            self._close()

    def _close(self) -> None:
        self.closed = True
        try:  # nothing more can reach the reader; do not fail again on exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._file.fileno())
        except (OSError, ValueError):
            pass
        if self._on_closed is not None:
            self._on_closed()

    def _cell(self, text: str, column: str, style: str = "") -> Text:
        width = self._widths[column] = max(self._widths[column], len(text))
        return Text(text.ljust(width) + " ", style=style)

    def _text(self, record: Mapping[str, Any]) -> Text:
        line = Text()
        ts = record.get("ts")
        if isinstance(ts, float | int):
            stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
            line.append(stamp + " ", style="dim")
        name = record.get("command")
        if name is None:
            line.append(self._cell("BAD LINE", "command", "bold red"))
            line.append(str(record.get("error")), style="red")
            return line
        line.append(self._cell(str(name), "command", _COMMAND_STYLES.get(str(name), "yellow")))
        if name == "RDATA":
            token = record.get("token")
            line.append(self._cell(str(record["stream"]), "stream", "cyan"))
            line.append(self._cell(str(record["writer"]), "writer", "yellow"))
            line.append(self._cell("?" if token is None else str(token), "token", "bold"))
            line.append(self._cell(record.get("kind") or "", "kind", "dim"))
            self._fields(line, record["row"])
            if record.get("fetched"):
                line.append(" (fetched)", style="dim italic")
            return line
        if name == "EVENT":
            line.append(self._cell(str(record["stream"]), "stream", "cyan"))
            line.append(self._cell(str(record["writer"]), "writer", "yellow"))
            line.append(self._cell(str(record["token"]), "token", "bold"))
            self._event(line, record)
            if record.get("fetched"):
                line.append(" (fetched)", style="dim italic")
            return line
        if name == "POSITION":
            line.append(self._cell(str(record["stream"]), "stream", "cyan"))
            line.append(self._cell(str(record["writer"]), "writer", "yellow"))
            line.append(f"{record['prev_token']} -> {record['new_token']}", style="bold")
            return line
        self._fields(line, {k: v for k, v in record.items() if k not in ("command", "ts")})
        return line

    @classmethod
    def _event(cls, line: Text, record: Mapping[str, Any]) -> None:
        """``ROOM SENDER: BODY`` for a message; room, sender, type and content
        fields for other events; what is known of a missing one."""
        event = record.get("event")
        if event is None:
            missing = record.get("missing") or {}
            line.append(printable(str(missing.get("room_id") or "?")) + " ", style="cyan")
            what = printable(str(missing.get("event_id")))
            if missing.get("type"):
                what += f" ({printable(str(missing['type']))})"
            reason = printable(str(missing.get("reason")))
            line.append(f"no content for {what}: {reason}", style="red")
            return
        content: Mapping[str, Any] = event.get("content") or {}
        line.append(printable(str(event["room_id"])) + " ", style="cyan")
        sender = printable(str(event["sender"]))
        kind = event["type"]
        if kind == "m.room.message" or kind == "m.room.encrypted":
            line.append(sender + ":", style="bold yellow")
            body = content.get("body")
            msgtype = content.get("msgtype")
            if kind == "m.room.encrypted":
                line.append(" (encrypted)", style="dim")
            elif event.get("redacted") or not content:
                line.append(
                    " (redacted)" if event.get("redacted") else " (no content)", style="dim"
                )
            else:
                if isinstance(msgtype, str) and msgtype not in _PLAIN_MSGTYPES:
                    line.append(f" [{printable(msgtype)}]", style="dim")
                text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
                line.append(" " + printable(text))
        else:
            line.append(sender + " ", style="bold yellow")
            line.append(printable(str(kind)), style="magenta")
            fields: dict[str, Any] = {}
            if event.get("state_key") is not None:
                fields["state_key"] = event["state_key"]
            if event.get("redacts"):
                fields["redacts"] = event["redacts"]
            fields.update(content)
            if fields:
                line.append(" ")
                cls._fields(line, fields, escape=True)
            if event.get("redacted"):
                line.append(" (redacted)", style="dim")
        if event.get("rejected"):
            reason = event.get("rejection_reason")
            line.append(
                f" (rejected: {printable(str(reason))})" if reason else " (rejected)", style="red"
            )
        if event.get("outlier"):
            line.append(" (outlier)", style="dim")

    @staticmethod
    def _fields(line: Text, fields: Mapping[str, Any], *, escape: bool = False) -> None:
        first = True
        for key, value in fields.items():
            if value is None or value is False:
                continue
            if not first:
                line.append(" ")
            first = False
            text = _value_text(value)
            line.append(f"{printable(key) if escape else key}=", style="dim")
            line.append(
                printable(text) if escape else text, style="red" if value == REDACTED else ""
            )


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
