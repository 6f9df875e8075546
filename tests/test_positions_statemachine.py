"""StreamPositions against a model cluster: writers, a lossy wire and HTTP catch-up.

The model cluster and its wire are tests/writer_model.py's ``ClusterModel``.

Invariants, checked after every step:
- a row is delivered at most once, with exactly the rows of its token, and
  each pair's tokens only go up;
- a token is a promise: every row at or below it was delivered, or lies
  before a "from now" writer's first POSITION, or inside a reported
  GapUnfillable range;
- every token move is announced by an event, so the events alone track
  ``current_token`` exactly;
- each FetchNeeded starts at our token, never asks beyond what the writer
  has, and one caused by a POSITION asks for exactly (our token, new];
- a pair has a fetch outstanding exactly while it is fetching;

At teardown the connection comes back and every writer answers REPLICATE;
once the wire is drained and fetches are served, a connected pair has every
RDATA sent on the current connection (no further POSITION needed).  Then
every writer announces its position once more and, after serving again,
every pair is connected at the writer's token and every row was delivered
or is excused as above.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule
from writer_model import (
    PAIRS,
    WRITERS,
    WRITERS_BY_STREAM,
    ClusterModel,
    Pair,
    Writer,
    label,
)

from synrepl.commands import Command, PositionCommand, RdataCommand
from synrepl.positions import (
    Event,
    FetchNeeded,
    GapUnfillable,
    PositionAdvanced,
    RowsReceived,
    StreamPositions,
)


class PositionsMachine(ClusterModel):
    sp: StreamPositions

    @initialize(
        max_buffered=st.sampled_from([1, 2, 3, 10_000]),
        from_now=st.sets(st.sampled_from(PAIRS), max_size=2),
        backlog=st.lists(st.integers(0, 3), min_size=len(PAIRS), max_size=len(PAIRS)),
        prompt=st.booleans(),
        connect_on_rdata=st.booleans(),
    )
    def start(
        self,
        max_buffered: int,
        from_now: set[Pair],
        backlog: list[int],
        prompt: bool,
        connect_on_rdata: bool,
    ) -> None:
        """Writers may already have rows (a backlog to catch up); the consumer starts from
        token 0 of each pair, or "from now" for a few."""
        self.max_buffered = max_buffered
        self.connect_on_rdata = connect_on_rdata
        self.sent_since_connect: dict[Pair, int] = {}
        self.make_writers(backlog)
        # Mirrors built from events alone.
        self.tokens: dict[Pair, int | None] = {p: None if p in from_now else 0 for p in PAIRS}
        self.seen_rows: set[str] = set()
        self.excused_upto: dict[Pair, int] = {}
        self.gaps: list[tuple[Pair, int, int]] = []
        self.outstanding: dict[Pair, tuple[int, int]] = {}
        start: dict[str, dict[str, int]] = {}
        for s, w in PAIRS:
            if (s, w) not in from_now:
                start.setdefault(s, {})[w] = 0
        self.sp = self._new_consumer(start)
        if prompt:
            for name in WRITERS:
                self.answer_replicate(name)

    def _new_consumer(self, start: dict[str, dict[str, int]]) -> StreamPositions:
        return StreamPositions(
            local_instance="me",
            start=start,
            writers=WRITERS_BY_STREAM,
            max_buffered=self.max_buffered,
            connect_on_rdata=self.connect_on_rdata,
        )

    # ------------------------------------------------------------ event checking

    def absorb(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, RowsReceived):
                pair = (event.stream, event.writer)
                cur = self.tokens[pair]
                assert cur is not None and event.token > cur, (event, cur)
                expected = self.writers[event.writer].streams[event.stream].history[event.token]
                assert list(event.rows) == expected, event
                for row in event.rows:
                    name = label(row)
                    assert name not in self.seen_rows, f"{name} delivered twice"
                    self.seen_rows.add(name)
                self.tokens[pair] = event.token
            elif isinstance(event, PositionAdvanced):
                pair = (event.stream, event.writer)
                cur = self.tokens[pair]
                assert event.token <= self.writers[event.writer].streams[event.stream].token
                if cur is None:
                    self.excused_upto[pair] = max(self.excused_upto.get(pair, 0), event.token)
                else:
                    assert event.token > cur, (event, cur)
                self.tokens[pair] = event.token
            elif isinstance(event, FetchNeeded):
                pair = (event.stream, event.writer)
                assert pair not in self.outstanding, event
                assert event.from_token == self.tokens[pair], (event, self.tokens[pair])
                assert event.from_token < event.upto_token
                assert event.upto_token <= self.writers[event.writer].streams[event.stream].token
                self.outstanding[pair] = (event.from_token, event.upto_token)
            elif isinstance(event, GapUnfillable):
                pair = (event.stream, event.writer)
                assert event.from_token == self.tokens[pair]
                self.gaps.append((pair, event.from_token, event.upto_token))
            else:  # pragma: no cover
                # No writer restarts here, so no StreamReset either.
                raise TypeError(f"unexpected event {event!r}")

    def receive(self, cmd: Command) -> None:
        assert isinstance(cmd, (RdataCommand, PositionCommand))
        pair = (cmd.stream_name, cmd.instance_name)
        was_fetching = self.sp.is_fetching(*pair)
        before = self.tokens[pair]
        events = self.sp.receive(cmd)
        if was_fetching:
            assert events == [], "a fetching pair only queues"
        fetches = [e for e in events if isinstance(e, FetchNeeded)]
        if isinstance(cmd, PositionCommand) and fetches:
            assert fetches == [FetchNeeded(*pair, before, cmd.new_token)]  # type: ignore[arg-type]
        self.absorb(events)

    def sent(self, writer: Writer, cmd: Command) -> None:
        if isinstance(cmd, RdataCommand) and cmd.token is not None:
            self.sent_since_connect[(cmd.stream_name, writer.name)] = cmd.token

    @rule(kind=st.sampled_from(["disconnect", "reconnect", "restart"]), prompt=st.booleans())
    def trouble(self, kind: str, prompt: bool) -> None:
        """The connection breaks, or we reconnect, or the consumer restarts."""
        if kind == "disconnect":
            self.disconnect()
        elif kind == "reconnect":
            self.reconnect(prompt)
        else:
            self.restart_consumer(prompt)

    def disconnect(self) -> None:
        """Everything in flight and everything sent until we reconnect is lost."""
        self.up = False
        self.sent_since_connect.clear()
        for writer in self.writers.values():
            writer.wire.clear()

    def reconnect(self, prompt: bool) -> None:
        """connection_lost, then every writer owes REPLICATE an answer (``prompt``: they
        all answer before sending anything else)."""
        self.up = True
        self.sent_since_connect.clear()
        self.absorb(self.sp.connection_lost())
        for name, writer in self.writers.items():
            writer.wire.clear()
            writer.owes_answer = True
            if prompt:
                self.answer_replicate(name)

    def restart_consumer(self, prompt: bool) -> None:
        """The consumer restarts from its checkpoint (fetches are lost)."""
        checkpoint = self.sp.positions()
        for pair in PAIRS:
            assert checkpoint.get(pair[0], {}).get(pair[1]) == self.tokens[pair]
        self.sp = self._new_consumer(checkpoint)
        self.outstanding.clear()
        self.reconnect(prompt)

    # ------------------------------------------------------------ HTTP catch-up

    @precondition(lambda self: self.outstanding)
    @rule(
        index=st.integers(0, 20),
        mode=st.sampled_from(["full", "page", "fail"]),
        page=st.integers(1, 3),
    )
    def serve_fetch(self, index: int, mode: str, page: int) -> None:
        """A pending fetch is answered: all at once, in limited pages, or failing."""
        pair = sorted(self.outstanding)[index % len(self.outstanding)]
        self.serve(pair, mode, page)

    @rule(modes=st.lists(st.sampled_from(["full", "page", "fail"]), min_size=1, max_size=6))
    def catch_up(self, modes: list[str]) -> None:
        """Everything on the wire arrives and fetches are served, each in its drawn way."""
        modes = list(modes)
        for _ in range(20):
            self.drain()
            if not self.outstanding:
                return
            for pair in sorted(self.outstanding):
                self.serve(pair, modes.pop() if modes else "full", 1)

    def serve(self, pair: Pair, mode: str, page: int) -> None:
        from_token, upto = self.outstanding.pop(pair)
        if mode == "fail":
            self.absorb(self.sp.fetch_failed(*pair, "model failure"))
            return
        history = self.writers[pair[1]].streams[pair[0]].history
        tokens = sorted(t for t in history if from_token < t <= upto)
        limited = mode == "page" and len(tokens) > page
        if limited:
            tokens = tokens[:page]
        updates = [(t, r) for t in tokens for r in history[t]]
        self.absorb(self.sp.fetched(*pair, updates, tokens[-1] if limited else upto, limited))

    # ------------------------------------------------------------ invariants

    @invariant()
    def events_track_the_tokens(self) -> None:
        for pair in PAIRS:
            assert self.sp.current_token(*pair) == self.tokens[pair], pair

    @invariant()
    def one_fetch_per_fetching_pair(self) -> None:
        assert set(self.outstanding) == {p for p in PAIRS if self.sp.is_requesting(*p)}

    @invariant()
    def no_holes_below_the_tokens(self) -> None:
        """A token is a promise: every row at or below it was delivered (or excused)."""
        for pair in PAIRS:
            cur = self.tokens[pair]
            if cur is not None:
                assert not self.unaccounted(pair, cur)

    # ------------------------------------------------------------ the end

    def settle(self) -> None:
        """Deliver everything and serve every fetch until nothing moves."""
        while True:
            self.drain()
            if not self.outstanding:
                return
            for pair in sorted(self.outstanding):
                self.serve(pair, "full", 0)

    def teardown(self) -> None:
        if not hasattr(self, "sp"):
            return
        if not self.up:
            self.reconnect(True)
        for name in WRITERS:
            self.answer_replicate(name)
        self.settle()
        # Without waiting for any further POSITION, a connected pair has everything
        # sent on this connection.
        for pair, sent in self.sent_since_connect.items():
            if self.sp.is_connected(*pair):
                cur = self.tokens[pair]
                assert cur is not None and cur >= sent, (pair, cur, sent)
        for pair in PAIRS:
            self.announce(pair)
        self.settle()
        for pair, cur in self.tokens.items():
            ws = self.writers[pair[1]].streams[pair[0]]
            assert cur == ws.token, (pair, cur, ws.token)
            assert self.sp.is_connected(*pair)
            lost = self.unaccounted(pair, ws.token)
            assert not lost, f"silently lost on {pair}: {lost}"
        for stream, writers in WRITERS_BY_STREAM.items():
            assert self.sp.persisted_upto(stream) == min(
                self.writers[w].streams[stream].token for w in writers
            )


TestPositionsMachine = PositionsMachine.TestCase
TestPositionsMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
