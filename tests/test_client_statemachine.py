"""ReplicationClient against a model cluster: positions and delivery together.

The real client (core and Twisted adapter) is driven line by line, with the
model's writers (tests/writer_model.py) as the truth.  The handler is
whatever a rule planned for its next batch: synchronous, slow (a Deferred
the machine fires later), already done (``defer.succeed``), a coroutine, or
raising.  The HTTP fetcher answers when a rule says so, in full, in limited
pages or failing, while live rows keep coming.  Bounds are tiny, so the
queue overflows and refills all the time.  Connections drop (everything in
flight is lost, as on Redis) and the client restarts from its checkpoint.

Invariants, after every step:
- per (stream, writer) the handler sees tokens in increasing order, each
  with exactly the writer's rows at that token, and no row twice (a row
  seen but not yet processed when the client restarted may be seen again);
- the checkpoint is a promise: every row at or below a processed position
  was seen, or lies before a "from now" start, or in a reported gap;
- at most one batch per stream is with the handler.

At teardown the connection comes back, every writer answers REPLICATE and
announces its position, handlers and fetches are let finish, and then every
pair is processed up to its writer's token and every row was seen or
excused as above.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule
from twisted.internet import defer, reactor
from writer_model import PAIRS, WRITERS, WRITERS_BY_STREAM, ClusterModel, Pair, label

from synrepl.commands import Command, PositionCommand, encode
from synrepl.config import config_from_dict
from synrepl.positions import GapUnfillable, RowsReceived
from synrepl.twisted.client import ReplicationClient

SERVER = "model.test"
STREAMS = tuple(WRITERS_BY_STREAM)
#: How a handler treats its batches: always at once, always slowly (a Deferred
#: the machine fires later), or in turn each of the ways a handler can return.
MOODS = ("sync", "slow", "mixed")
MIXED = ("sync", "slow", "succeed", "coroutine", "slow", "raise")


@attrs.frozen
class Page:
    updates: list[tuple[int, Any]]
    upto_token: int
    limited: bool


@attrs.define
class Request:
    pair: Pair
    from_token: int
    upto_token: int
    answer: defer.Deferred[Page]


class ModelFetcher:
    """Answers nothing by itself: the machine serves each request when it chooses."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def get_repl_stream_updates(
        self, instance: str, stream: str, from_token: int, upto_token: int
    ) -> defer.Deferred[Page]:
        d: defer.Deferred[Page] = defer.Deferred()
        self.requests.append(Request((stream, instance), from_token, upto_token, d))
        return d


def config() -> Any:
    return config_from_dict(
        {
            "server_name": SERVER,
            "redis": {"enabled": True, "host": "127.0.0.1", "port": 1},
            "instance_map": {
                ("main" if w == "master" else w): {"host": "127.0.0.1", "port": 2} for w in WRITERS
            },
            "stream_writers": {"events": ["master", "p1", "p2"], "receipts": ["master", "p1"]},
        }
    )


class ClientMachine(ClusterModel):
    client: ReplicationClient

    @initialize(
        bound=st.sampled_from([1, 2, 3, 5, 10_000]),
        from_now=st.sets(st.sampled_from(PAIRS), max_size=2),
        backlog=st.lists(st.integers(0, 3), min_size=len(PAIRS), max_size=len(PAIRS)),
        prompt=st.sampled_from([True, True, True, False]),
        moods=st.lists(st.sampled_from(MOODS), min_size=len(STREAMS), max_size=len(STREAMS)),
    )
    def start(
        self,
        bound: int,
        from_now: set[Pair],
        backlog: list[int],
        prompt: bool,
        moods: list[str],
    ) -> None:
        """Writers may already have rows; the client starts at token 0 of each pair,
        or "from now" for a few."""
        self.bound = bound
        self.config = config()
        self.make_writers(backlog)
        self.seen: dict[Pair, list[int]] = {p: [] for p in PAIRS}
        self.seen_rows: set[str] = set()
        self.excused_upto: dict[Pair, int] = {}
        self.gaps: list[tuple[Pair, int, int]] = []
        self.moods = dict(zip(STREAMS, moods, strict=True))
        self.calls = 0
        self.held: dict[str, defer.Deferred[None]] = {}
        self.out: dict[str, RowsReceived] = {}
        start = {
            s: {w: 0 for w in ws if (s, w) not in from_now} for s, ws in WRITERS_BY_STREAM.items()
        }
        self.new_client({s: t for s, t in start.items() if t})
        if prompt:
            for name in WRITERS:
                self.answer_replicate(name)

    def new_client(self, start: dict[str, dict[str, int]]) -> None:
        self.fetcher = ModelFetcher()
        self.from_now = {p for p in PAIRS if p[1] not in start.get(p[0], {})}
        client = ReplicationClient(
            reactor,
            self.config,
            instance_name="me",
            start=start,
            fetcher=self.fetcher,
            max_pending_rows=self.bound,
        )
        client.on_rows(None, lambda batch: self.handler(client, batch))
        client.on_gap(lambda gap: self.gap(client, gap))
        self.client = client

    # ------------------------------------------------------------ the handler

    def handler(self, client: ReplicationClient, batch: RowsReceived) -> object:
        if client is not self.client:  # an abandoned client (restarted)
            return None
        pair = (batch.stream, batch.writer)
        assert batch.stream not in self.out, f"two batches of {batch.stream} out at once"
        tokens = self.seen[pair]
        assert not tokens or batch.token > tokens[-1], (pair, batch.token, tokens[-5:])
        expected = self.writers[batch.writer].streams[batch.stream].history.get(batch.token)
        assert expected is not None and list(batch.rows) == expected, (pair, batch)
        for row in batch.rows:
            name = label(row)
            assert name not in self.seen_rows, f"{name} seen twice ({pair} at {batch.token})"
            self.seen_rows.add(name)
        tokens.append(batch.token)
        mood = self.moods[batch.stream]
        self.calls += 1
        kind = MIXED[self.calls % len(MIXED)] if mood == "mixed" else mood
        if kind == "sync":
            return None
        if kind == "succeed":
            return defer.succeed(None)
        if kind == "raise":
            raise RuntimeError("the handler failed")
        if kind == "coroutine":

            async def done() -> None:
                return None

            return done()
        self.out[batch.stream] = batch
        d: defer.Deferred[None] = defer.Deferred()
        self.held[batch.stream] = d
        return d

    def gap(self, client: ReplicationClient, gap: GapUnfillable) -> None:
        if client is self.client:
            self.gaps.append(((gap.stream, gap.writer), gap.from_token, gap.upto_token))

    @rule(stream=st.sampled_from(STREAMS), mood=st.sampled_from(MOODS))
    def change_mood(self, stream: str, mood: str) -> None:
        """The handler of a stream becomes faster or slower."""
        self.moods[stream] = mood

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 5))
    def finish(self, index: int) -> None:
        """A slow handler call completes."""
        stream = sorted(self.held)[index % len(self.held)]
        self.release(stream)

    def release(self, stream: str) -> None:
        d = self.held.pop(stream)
        del self.out[stream]
        d.callback(None)

    # ------------------------------------------------------------ writers and the wire

    @rule(pair=st.sampled_from(PAIRS), count=st.integers(2, 12))
    def burst(self, pair: Pair, count: int) -> None:
        """A writer writes several tokens quickly and they all arrive."""
        for n in range(count):
            self.publish(pair, 1 + n % 2)
        self.deliver(pair[1], 3 * count)

    def receive(self, cmd: Command) -> None:
        if isinstance(cmd, PositionCommand):
            pair = (cmd.stream_name, cmd.instance_name)
            if pair in self.from_now:
                self.from_now.discard(pair)
                self.excused_upto[pair] = cmd.new_token
        self.client._line_received(SERVER, encode(cmd))

    @rule(
        kind=st.sampled_from(["disconnect", "reconnect", "restart"]),
        prompt=st.sampled_from([True, True, False]),
    )
    def trouble(self, kind: str, prompt: bool) -> None:
        """The connection breaks, or comes back, or the client restarts from its checkpoint."""
        if kind == "disconnect":
            self.up = False
            for writer in self.writers.values():
                writer.wire.clear()
        elif kind == "reconnect":
            self.reconnect(prompt)
        else:
            self.restart(prompt)

    def reconnect(self, prompt: bool) -> None:
        self.up = True
        self.client._connection_lost()
        for name, writer in self.writers.items():
            writer.wire.clear()
            writer.owes_answer = True
            if prompt:
                self.answer_replicate(name)

    def restart(self, prompt: bool) -> None:
        """What was seen but not processed may be seen again by the new client."""
        checkpoint = self.client.positions()
        for pair in PAIRS:
            done = checkpoint.get(pair[0], {}).get(pair[1])
            again = [t for t in self.seen[pair] if done is None or t > done]
            history = self.writers[pair[1]].streams[pair[0]].history
            for token in again:
                self.seen_rows.difference_update(label(r) for r in history[token])
            self.seen[pair] = [t for t in self.seen[pair] if t not in again]
        self.held.clear()
        self.out.clear()
        self.new_client(checkpoint)
        self.reconnect(prompt)

    # ------------------------------------------------------------ HTTP

    @precondition(lambda self: self.fetcher.requests)
    @rule(
        index=st.integers(0, 20),
        mode=st.sampled_from(["full", "page", "fail"]),
        page=st.integers(1, 3),
    )
    def serve_fetch(self, index: int, mode: str, page: int) -> None:
        """A pending request is answered: all at once, a limited page, or failing."""
        request = self.fetcher.requests.pop(index % len(self.fetcher.requests))
        self.serve(request, mode, page)

    def serve(self, request: Request, mode: str, page: int) -> None:
        if mode == "fail":
            request.answer.errback(ConnectionRefusedError("model failure"))
            return
        stream, writer = request.pair
        history = self.writers[writer].streams[stream].history
        tokens = sorted(t for t in history if request.from_token < t <= request.upto_token)
        limited = mode == "page" and len(tokens) > page
        if limited:
            tokens = tokens[:page]
        updates = [(t, r.to_raw()) for t in tokens for r in history[t]]
        upto = tokens[-1] if limited else request.upto_token
        request.answer.callback(Page(updates, upto, limited))

    # ------------------------------------------------------------ invariants

    @invariant()
    def checkpoint_is_a_promise(self) -> None:
        """Every row at or below a processed position was seen (or is excused)."""
        checkpoint = self.client.positions()
        for pair in PAIRS:
            done = checkpoint.get(pair[0], {}).get(pair[1])
            if done is not None:
                assert not self.unaccounted(pair, done), (pair, done, self.unaccounted(pair, done))

    # ------------------------------------------------------------ the end

    def settle(self) -> None:
        for stream in STREAMS:
            self.moods[stream] = "sync"
        for _ in range(1000):
            moved = self.drain()
            for stream in list(self.held):
                moved = True
                self.release(stream)
            while self.fetcher.requests:
                moved = True
                self.serve(self.fetcher.requests.pop(0), "full", 0)
            if not moved:
                return
        raise AssertionError("the client never settled")

    def teardown(self) -> None:
        if not hasattr(self, "client"):
            return
        if not self.up:
            self.reconnect(True)
        for name in WRITERS:
            self.answer_replicate(name)
        self.settle()
        for pair in PAIRS:
            self.announce(pair)
        self.settle()
        checkpoint = self.client.positions()
        for pair in PAIRS:
            ws = self.writers[pair[1]].streams[pair[0]]
            assert checkpoint[pair[0]][pair[1]] == ws.token, (pair, checkpoint, ws.token)
            assert not self.unaccounted(pair, ws.token), f"silently lost on {pair}"
        for stream in STREAMS:
            assert self.client.pending_rows(stream) == 0


TestClientMachine = ClientMachine.TestCase
TestClientMachine.settings = settings(max_examples=300, stateful_step_count=80, deadline=None)
