"""How ``watch`` writes its output: JSON lines through orjson (the standard
library for what orjson refuses), text laid out without rich where rich
would print the same, and lines held while stdout is a pipe, written once
the input that was ready is handled; a subprocess against the real Redis
checks that a pipe reader gets each line without more traffic, and the
last ones on SIGTERM."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import pytest_twisted
import redis as redis_py
from client_helpers import unique_server_name, wait_until
from test_cli_support import json_lines, kill_leftover_clis, start_cli
from twisted.internet import task

from synrepl.cli._render import (
    MAX_HELD_LINES,
    Output,
    command_record,
    event_record,
    json_line,
    make_console,
    row_record,
)
from synrepl.commands import RdataCommand, UserSyncCommand, encode
from synrepl.events import FullEvent, MissingEvent
from synrepl.streams import CurrentStateRow, EventRow, TypingRow

__all__ = ("kill_leftover_clis",)  # the fixture

#: Plain Python's stdout buffering, not the -u that the test environment may set.
BUFFERED = {"PYTHONUNBUFFERED": ""}


def ev(n: int, event_id: str | None = None) -> EventRow:
    return EventRow(
        event_id or f"$e{n}", "!r:t", "m.room.message", None, None, None, None, False, False
    )


def nested(depth: int) -> list[Any]:
    value: list[Any] = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


def records() -> list[dict[str, Any]]:
    """Records of every kind, some with characters rich strips or that need escaping."""
    return [
        row_record("events", "persister1", 7, ev(1), ts=1.25),
        row_record("events", "master", None, CurrentStateRow("!r:t", "m.room.topic", "", "$1")),
        row_record("typing", "master", 3, TypingRow("!r:t", ("@a:t", "@b\tc:t")), ts=2.0),
        row_record("typing", "master", 4, TypingRow("!r:t", ("@a\x07b:t", "\u202e")), ts=2.5),
        row_record("typing", "a-very-long-writer-name", 5, TypingRow("!r:t", ()), fetched=True),
        command_record(UserSyncCommand("sync1", "@a:t", "DEV", True, 1234), ts=3.0),
        event_record("events", "master", 9, FullEvent("$9", "!r:t", "m.room.message", "@a:t")),
        event_record(
            "events",
            "master",
            10,
            FullEvent("$10", "!r:t", "m.room.message", "@a:t", content={"body": "a\nb 👋"}),
        ),
        event_record("events", "master", 11, MissingEvent("$11", "!r:t", None, "gone")),
        {"command": "FOO", "data": "x y", "n": [1, {"k": "é"}], "ts": 4.0},
        {"command": "FOO", "data": "bell\x07", "ts": 4.5},  # rich strips \x07
        {"command": None, "error": "unknown command 'X\x1b'", "channel": "c", "ts": 5.0},
    ]


def text_stream() -> io.TextIOWrapper:
    """What stdout is when it is a pipe: text over bytes, UTF-8, not a tty."""
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)


def written(stream: io.TextIOWrapper) -> bytes:
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue()


# --- JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        2**64,  # beyond orjson's 64 bits
        -(2**63) - 1,
        {"nested": [{"deep": 123456789012345678901234567890}]},
        "\ud800 lone surrogate",  # UTF-8 cannot hold it: written as its escape
        {1: "a non-str key"},
        nested(300),  # deeper than orjson's 255 levels
        "é 👋 \u2028 \x00",
    ],
)
def test_json_lines_are_the_same_json_when_orjson_refuses_the_value(value: Any) -> None:
    """Values orjson refuses (and some it takes) come out as one UTF-8 line
    of the JSON the standard library makes of them."""
    record = {"command": "RDATA", "row": {"value": value}, "ts": 1.5}
    line = json_line(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line.decode("utf-8")) == json.loads(json.dumps(record))


@pytest.mark.parametrize("beside", [None, 2**70, "\udfff"])
def test_non_finite_floats_are_null_whoever_writes_the_line(beside: Any) -> None:
    """An out-of-range float from the wire (``1e999``) is null, valid JSON,
    whether orjson writes the line or the standard library does (for a value
    beside it that orjson refuses)."""
    row = {"big": float("inf"), "neg": float("-inf"), "nan": [float("nan")], "v": beside}
    line = json_line({"command": "RDATA", "row": row})
    assert json.loads(line) == {
        "command": "RDATA",
        "row": {"big": None, "neg": None, "nan": [None], "v": beside},
    }


def test_json_line_with_a_lone_surrogate_reaches_stdout() -> None:
    """A lone surrogate from the wire is printed (as an escape), not taken
    for a closed stdout."""
    stream = text_stream()
    closed: list[bool] = []
    output = Output(json_mode=True, file=stream, on_closed=lambda: closed.append(True))
    output.emit({"command": "RDATA", "row": {"v": "a\udc80b"}})
    assert not closed
    assert written(stream) == b'{"command":"RDATA","row":{"v":"a\\udc80b"}}\n'


def test_json_lines_hold_the_same_records_as_json_dumps() -> None:
    """Each record's line is the JSON json.dumps made of it (compact now)."""
    for record in records():
        assert json.loads(json_line(record)) == json.loads(json.dumps(record, ensure_ascii=False))


# --- text -----------------------------------------------------------------------------


@pytest.mark.parametrize("color", ["never", "always"])
def test_text_lines_are_what_rich_prints(color: str) -> None:
    """The text written without rich is, byte for byte, what rich's console
    prints of the same line (plain, and with colour)."""
    stream = text_stream()
    output = Output(json_mode=False, color=color, file=stream)
    expected = io.StringIO()
    console = make_console(color, file=expected)
    shadow = Output(json_mode=False, color=color, file=io.StringIO())  # the same widths
    for record in records():
        output.emit(record)
        console.print(shadow._text(record))
    assert written(stream).decode("utf-8") == expected.getvalue()
    if color == "always":
        assert "\x1b[" in expected.getvalue()


# --- when lines are written -------------------------------------------------------------


def test_lines_are_held_until_the_reactor_turns_when_stdout_is_a_pipe() -> None:
    """With a reactor and a stdout that is not a terminal, lines wait for the
    reactor's next turn (once the input that was ready is handled), then go
    out in one write; flush() writes them at once and cancels that call."""
    clock = task.Clock()
    stream = text_stream()
    output = Output(json_mode=True, file=stream, reactor=clock)
    output.emit({"n": 1})
    output.emit({"n": 2})
    assert written(stream) == b""
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert written(stream) == b'{"n":1}\n{"n":2}\n'
    output.emit({"n": 3})
    output.flush()
    assert written(stream) == b'{"n":1}\n{"n":2}\n{"n":3}\n'
    assert clock.getDelayedCalls() == []


def test_held_lines_are_written_once_there_are_many() -> None:
    """However long the reactor stays busy, no more than MAX_HELD_LINES wait."""
    clock = task.Clock()
    stream = text_stream()
    output = Output(json_mode=False, color="never", file=stream, reactor=clock)
    for n in range(MAX_HELD_LINES):
        output.emit({"command": "PING", "data": str(n)})
    assert written(stream).count(b"\n") == MAX_HELD_LINES


def test_each_line_is_flushed_on_a_terminal_or_without_a_reactor() -> None:
    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    clock = task.Clock()
    tty = Terminal(io.BytesIO(), encoding="utf-8")
    Output(json_mode=True, file=tty, reactor=clock).emit({"n": 1})
    assert written(tty) == b'{"n":1}\n'
    stream = text_stream()
    Output(json_mode=True, file=stream).emit({"n": 2})
    assert written(stream) == b'{"n":2}\n'
    assert clock.getDelayedCalls() == []


def test_a_closed_pipe_is_noticed_when_held_lines_are_written() -> None:
    """A reader gone (``watch | head``) is noticed at the write, which may
    now come after emit: on_closed once, and nothing more is written."""

    class Gone(io.RawIOBase):
        writes = 0

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            Gone.writes += 1
            raise BrokenPipeError

    clock = task.Clock()
    closed: list[bool] = []
    stream = io.TextIOWrapper(io.BufferedWriter(Gone()), encoding="utf-8")
    output = Output(
        json_mode=True, file=stream, reactor=clock, on_closed=lambda: closed.append(True)
    )
    output.emit({"n": 1})
    assert not closed
    clock.advance(0)
    assert closed == [True] and output.closed
    output.emit({"n": 2})
    output.flush()
    assert closed == [True] and Gone.writes == 1


# --- the real thing ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["--json", "--color=never"])
@pytest_twisted.ensureDeferred
async def test_a_pipe_reader_gets_each_line_without_more_traffic(mode: str) -> None:
    """Piped (stdout buffered, as without -u), watch writes what it received
    once the input goes quiet: a lone message, then a burst larger than the
    lines it holds, each reach the reader with nothing published after them;
    on SIGTERM the rows of a batch still open come out too."""
    server_name = unique_server_name()
    cli = start_cli(
        "watch", "--server-name", server_name, "--redis-url", "redis://127.0.0.1:6379", mode,
        env=BUFFERED,
    )  # fmt: skip
    publisher = redis_py.Redis(host="127.0.0.1", port=6379)
    burst = 3 * MAX_HELD_LINES + 7
    try:
        await cli.wait_for_stderr("synrepl watch:")
        publisher.publish(server_name, encode(UserSyncCommand("sync1", "@a:t", "D", True, 1)))
        await wait_until(lambda: "USER_SYNC" in cli.stdout, what="the lone line")
        pipe = publisher.pipeline(transaction=False)
        for n in range(burst):
            pipe.publish(server_name, f"RDATA typing master {n + 1} " + '["!r:t", []]')
        pipe.publish(server_name, encode(RdataCommand("events", "master", None, ev(0, "$held"))))
        pipe.execute()
        await wait_until(
            lambda: cli.stdout.count("\n") == 1 + burst, what=f"{burst} lines of the burst"
        )
        assert "$held" not in cli.stdout  # its batch has not completed
    finally:
        publisher.close()
        cli.signal("TERM")
        code = await cli.wait()
    assert code == 0, cli.stderr
    lines = cli.stdout.splitlines()
    assert len(lines) == 2 + burst
    assert "$held" in lines[-1]
    if mode == "--json":
        shown = json_lines(cli.stdout)
        assert [r["token"] for r in shown[1:-1]] == list(range(1, burst + 1))
        assert shown[-1]["token"] is None and shown[-1]["row"]["event_id"] == "$held"
    else:
        assert "\x1b" not in cli.stdout  # no colour in a pipe
