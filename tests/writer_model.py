"""The model cluster of the state-machine tests: writers, their rows, their wire.

Each writer keeps, per stream, its rows by token, its current token and
``last`` (the token Synapse would put in a POSITION's ``prev``), and the
messages it sent that have not arrived yet.
"""

from __future__ import annotations

from collections import deque

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from synrepl.commands import Command, PositionCommand, RdataCommand
from synrepl.streams import AnyRow, parse_row

WRITERS_BY_STREAM = {
    "events": ("master", "p1", "p2"),
    "receipts": ("master", "p1"),
    "typing": ("master",),  # resettable, single writer as in Synapse
}
PAIRS = tuple((s, w) for s, ws in WRITERS_BY_STREAM.items() for w in ws)
WRITERS = ("master", "p1", "p2")

Pair = tuple[str, str]


def make_row(stream: str, n: int) -> AnyRow:
    if stream == "typing":
        return parse_row("typing", [f"!r{n}:x", [f"@u{n}:x"]])
    if stream == "receipts":
        return parse_row("receipts", ["!r:x", "m.read", "@u:x", f"$e{n}", None, {"ts": n}])
    return parse_row(
        "events", ["ev", [f"$e{n}", "!r:x", "m.room.message", None, None, None, None, False, False]]
    )


def label(row: AnyRow) -> str:
    """The unique name a model row was made with."""
    return getattr(row, "room_id" if type(row).__name__ == "TypingRow" else "event_id")  # type: ignore[no-any-return]


@attrs.define
class WriterStream:
    token: int = 0
    last: int = 0
    history: dict[int, list[AnyRow]] = attrs.Factory(dict)


@attrs.define
class Writer:
    name: str
    streams: dict[str, WriterStream]
    wire: deque[Command] = attrs.Factory(deque)
    owes_answer: bool = True


class ClusterModel(RuleBasedStateMachine):
    """The writers' rules, shared by the state machines that consume their wire.

    Redis keeps one publisher's messages in order and does not lose one in
    the middle of a live connection, so each writer's wire is a FIFO, and
    loss comes only with a dropped connection (``up`` False: what is sent
    is lost).  Two kinds of damage Redis does not do are tried anyway because
    the protocol copes with them: a POSITION vanishing, and a numeric RDATA
    or POSITION arriving twice.  (A duplicated ``batch`` line cannot be told
    apart from a real second row, so it is not tried.)

    A subclass consumes commands in :meth:`receive`.
    """

    writers: dict[str, Writer]
    up: bool
    next_row: int
    #: Labels of the rows the consumer handed on.
    seen_rows: set[str]
    #: Per pair, the token up to which rows are not expected (a "from now" start).
    excused_upto: dict[Pair, int]
    #: Ranges the consumer reported lost: ``(pair, from_token, upto_token)``.
    gaps: list[tuple[Pair, int, int]]

    def make_writers(self, backlog: list[int]) -> None:
        """The model's writers, each pair with ``backlog`` tokens written before
        anyone listened."""
        self.writers = {
            name: Writer(
                name, {s: WriterStream() for s, ws in WRITERS_BY_STREAM.items() if name in ws}
            )
            for name in WRITERS
        }
        self.up = False
        self.next_row = 0
        for pair, count in zip(PAIRS, backlog, strict=True):
            for _ in range(count):
                self.publish(pair, 2)
        self.up = True

    def receive(self, cmd: Command) -> None:
        raise NotImplementedError

    def unaccounted(self, pair: Pair, upto: int) -> list[str]:
        """Rows of ``pair`` up to ``upto`` neither seen nor excused by a reported
        gap or a "from now" start."""
        history = self.writers[pair[1]].streams[pair[0]].history
        lost = []
        for token, rows in history.items():
            if token > upto or token <= self.excused_upto.get(pair, -1):
                continue
            if any(p == pair and lo < token <= hi for p, lo, hi in self.gaps):
                continue
            lost += [f"{label(r)}@{token}" for r in rows if label(r) not in self.seen_rows]
        return lost

    def sent(self, writer: Writer, cmd: Command) -> None:
        """Called for each command put on a live wire."""

    def send(self, writer: Writer, cmd: Command) -> None:
        if self.up:
            writer.wire.append(cmd)
            self.sent(writer, cmd)

    @rule(pair=st.sampled_from(PAIRS), nrows=st.integers(1, 3))
    def publish(self, pair: Pair, nrows: int) -> None:
        """A writer persists rows at its next token and sends them (batch lines first)."""
        stream, name = pair
        writer = self.writers[name]
        ws = writer.streams[stream]
        ws.token += 1
        rows = []
        for i in range(nrows):
            self.next_row += 1
            row = make_row(stream, self.next_row)
            rows.append(row)
            token = ws.token if i == nrows - 1 else None
            self.send(writer, RdataCommand(stream, name, token, row))
        ws.history[ws.token] = rows
        ws.last = ws.token

    @rule(pair=st.sampled_from(PAIRS), k=st.integers(1, 3), quietly=st.booleans())
    def allocate(self, pair: Pair, k: int, quietly: bool) -> None:
        """The writer's token moves without rows.  ``quietly``: Synapse's ``last_token``
        moves too without anything being sent, so a later POSITION's prev is ahead of
        the last RDATA (as seen in real traffic)."""
        ws = self.writers[pair[1]].streams[pair[0]]
        ws.token += k
        if quietly:
            ws.last = ws.token

    @rule(pair=st.sampled_from(PAIRS))
    def announce(self, pair: Pair) -> None:
        """The writer sends POSITION last token."""
        writer = self.writers[pair[1]]
        ws = writer.streams[pair[0]]
        self.send(writer, PositionCommand(pair[0], pair[1], ws.last, ws.token))
        ws.last = ws.token

    @precondition(lambda self: self.up)
    @rule(name=st.sampled_from(WRITERS))
    def answer_replicate(self, name: str) -> None:
        """The writer answers our REPLICATE: POSITION last last for each of its streams."""
        writer = self.writers[name]
        if writer.owes_answer:
            writer.owes_answer = False
            for stream, ws in writer.streams.items():
                writer.wire.append(PositionCommand(stream, name, ws.last, ws.last))

    @rule(name=st.sampled_from(WRITERS), count=st.integers(1, 12))
    def deliver(self, name: str, count: int) -> None:
        """Messages from one writer arrive, in order (writers interleave by rule choice)."""
        wire = self.writers[name].wire
        for _ in range(count):
            if not wire:
                return
            self.receive(wire.popleft())

    @rule(name=st.sampled_from(WRITERS), kind=st.sampled_from(["duplicate", "lose"]))
    def damage(self, name: str, kind: str) -> None:
        """The next numeric RDATA or POSITION arrives twice, or the next POSITION vanishes."""
        wire = self.writers[name].wire
        if not wire:
            return
        head = wire[0]
        if kind == "lose":
            if isinstance(head, PositionCommand):
                wire.popleft()
        elif not (isinstance(head, RdataCommand) and head.token is None):
            self.receive(head)
            self.receive(wire.popleft())

    def drain(self) -> bool:
        """Everything on the wire arrives; False if there was nothing."""
        moved = False
        for writer in self.writers.values():
            while writer.wire:
                moved = True
                self.receive(writer.wire.popleft())
        return moved
