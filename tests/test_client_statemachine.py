"""ReplicationClient against a model cluster: positions and delivery together.

The real client (core and Twisted adapter) is driven line by line, with the
model's writers (tests/writer_model.py) as the truth, on a clock the machine
moves.  The handler is, per stream, in a mood a rule sets: synchronous, slow
(a Deferred the machine fires later), or in turn every way a handler can
return, raising included (then the batch is retried after a delay, and
dead-lettered after the last retry).  The HTTP fetcher answers when a rule
says so, in full, in limited pages or failing, while live rows keep coming.
Bounds are tiny, so the queue overflows and refills all the time.
Connections drop (everything in flight is lost, as on Redis), and the client
restarts: cleanly from its positions, or, with a checkpoint store, as after
a crash from the last checkpoint saved.  Checkpoint saves and dead letters
complete (or fail) when a rule says so.  The client is sometimes read-only,
connecting pairs from their RDATA instead of a POSITION.

Invariants, after every step:
- per (stream, writer) the handler completes tokens in increasing order,
  each with exactly the writer's rows at that token, and no row twice (a
  row completed but not yet checkpointed when the client restarted may be
  completed again); a retry hands over the very batch that failed;
- after a crash, at most one completed batch per stream lies past the saved
  checkpoint (acknowledge after handling);
- the checkpoint is a promise: every row at or below a processed (or saved)
  position was completed or dead-lettered, or lies before a "from now"
  start, or in a reported gap;
- at most one batch per stream is with the handler.

At teardown the connection comes back, every writer answers REPLICATE and
announces its position, handlers and fetches are let finish, and then every
pair is processed up to its writer's token and every row was seen or
excused as above.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule
from twisted.internet import defer, task
from writer_model import PAIRS, WRITERS, WRITERS_BY_STREAM, ClusterModel, Pair, label

from synrepl.commands import Command, PositionCommand, RdataCommand, encode
from synrepl.config import config_from_dict
from synrepl.deadletters import DeadLetter
from synrepl.delivery import HandlerFailurePolicy
from synrepl.positions import GapUnfillable, RowsReceived
from synrepl.twisted.client import ReplicationClient

SERVER = "model.test"
STREAMS = tuple(WRITERS_BY_STREAM)
#: How a handler treats its batches: always at once, always slowly (a Deferred
#: the machine fires later), in turn each of the ways a handler can return,
#: or always raising (so its batches end in the dead-letter store).
MOODS = ("sync", "slow", "mixed", "failing")
MIXED = ("sync", "slow", "succeed", "coroutine", "slow", "raise")
POLICY = HandlerFailurePolicy(retries=1, base_delay=0.5, then="dead_letter")


class MemoryCheckpoints:
    """A checkpoint store whose saves are durable once the machine completes them."""

    def __init__(self) -> None:
        self.saved: dict[str, dict[str, int]] | None = None

    def load(self) -> dict[str, dict[str, int]] | None:
        return None if self.saved is None else {s: dict(t) for s, t in self.saved.items()}

    def save(self, positions: Mapping[str, Mapping[str, int]]) -> None:
        self.saved = {s: dict(t) for s, t in positions.items()}

    def close(self) -> None:
        pass


class MemoryDeadLetters:
    def __init__(self, machine: ClientMachine) -> None:
        self.machine = machine
        self.stored: list[DeadLetter] = []

    def add(self, letter: DeadLetter) -> None:
        self.stored.append(letter)
        self.machine.completed((letter.stream, letter.writer), letter.token)

    def letters(self) -> list[DeadLetter]:
        return list(self.stored)

    def close(self) -> None:
        pass


class ModelClient(ReplicationClient):
    """The real client, whose blocking calls (stores) wait for the machine."""

    machine: ClientMachine

    def _in_thread(self, call: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.machine.io.append((self, call, d))
        return d


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
        checkpointing=st.booleans(),
        read_only=st.booleans(),
    )
    def start(
        self,
        bound: int,
        from_now: set[Pair],
        backlog: list[int],
        prompt: bool,
        moods: list[str],
        checkpointing: bool,
        read_only: bool,
    ) -> None:
        """Writers may already have rows; the client starts at token 0 of each pair,
        or "from now" for a few."""
        self.bound = bound
        self.read_only = read_only
        self.io: list[tuple[ModelClient, Any, defer.Deferred[Any]]] = []
        self.checkpoints = MemoryCheckpoints() if checkpointing else None
        self.dead_letters = MemoryDeadLetters(self)
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
        #: Per stream, the batch whose handler failed, until it is retried.
        self.failed: dict[str, RowsReceived] = {}
        start = {
            s: {w: 0 for w in ws if (s, w) not in from_now} for s, ws in WRITERS_BY_STREAM.items()
        }
        if self.checkpoints is not None:
            self.checkpoints.saved = {s: t for s, t in start.items() if t}
            self.new_client(None)
        else:
            self.new_client({s: t for s, t in start.items() if t})
        if prompt:
            for name in WRITERS:
                self.answer_replicate(name)

    def new_client(self, start: dict[str, dict[str, int]] | None) -> None:
        self.fetcher = ModelFetcher()
        self.clock = task.Clock()  # a crashed client's timers die with it
        client = ModelClient(
            self.clock,
            self.config,
            instance_name="me",
            start=start,
            read_only=self.read_only,
            fetcher=self.fetcher,
            max_pending_rows=self.bound,
            checkpoint=self.checkpoints,
            dead_letters=self.dead_letters,
            failure_policy=POLICY,
            silent_after=None,
        )
        client.machine = self
        client.on_rows(None, lambda batch: self.handler(client, batch))
        client.on_gap(lambda gap: self.gap(client, gap))
        self.client = client
        self.io.clear()
        defer.ensureDeferred(client._load_start())
        while self.io:  # the checkpoint loads before any traffic
            self.complete(0, False)
        known = client.positions()
        self.from_now = {p for p in PAIRS if p[1] not in known.get(p[0], {})}

    # ------------------------------------------------------------ the handler

    def handler(self, client: ReplicationClient, batch: RowsReceived) -> object:
        if client is not self.client:  # an abandoned client (restarted)
            return None
        pair = (batch.stream, batch.writer)
        assert batch.stream not in self.out, f"two batches of {batch.stream} out at once"
        failed = self.failed.pop(batch.stream, None)
        assert failed is None or failed is batch, "a retry hands over the batch that failed"
        tokens = self.seen[pair]
        assert not tokens or batch.token > tokens[-1], (pair, batch.token, tokens[-5:])
        expected = self.writers[batch.writer].streams[batch.stream].history.get(batch.token)
        assert expected is not None and list(batch.rows) == expected, (pair, batch)
        mood = self.moods[batch.stream]
        self.calls += 1
        kind = MIXED[self.calls % len(MIXED)] if mood == "mixed" else mood
        if kind in ("raise", "failing"):
            self.failed[batch.stream] = batch
            raise RuntimeError("the handler failed")
        if kind == "slow":
            self.out[batch.stream] = batch
            d: defer.Deferred[None] = defer.Deferred()
            self.held[batch.stream] = d
            return d
        self.completed(pair, batch.token)
        if kind == "succeed":
            return defer.succeed(None)
        if kind == "coroutine":

            async def done() -> None:
                return None

            return done()
        return None

    def completed(self, pair: Pair, token: int) -> None:
        """The handler finished with (or the dead-letter store took) a batch."""
        for row in self.writers[pair[1]].streams[pair[0]].history[token]:
            name = label(row)
            assert name not in self.seen_rows, f"{name} completed twice ({pair} at {token})"
            self.seen_rows.add(name)
        self.seen[pair].append(token)

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
        batch = self.out.pop(stream)
        self.completed((batch.stream, batch.writer), batch.token)
        d.callback(None)

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 5.0]))
    def tick(self, seconds: float) -> None:
        """Time passes: retries that are due run."""
        self.clock.advance(seconds)

    @precondition(lambda self: self.io)
    @rule(index=st.integers(0, 5), fail=st.booleans())
    def finish_io(self, index: int, fail: bool) -> None:
        """A checkpoint save or a dead letter completes, or fails."""
        self.complete(index, fail)

    def complete(self, index: int, fail: bool) -> None:
        _, call, done = self.io.pop(index % len(self.io))
        if fail:
            done.errback(OSError("the disk is full"))
        else:
            done.callback(call())

    # ------------------------------------------------------------ writers and the wire

    @rule(pair=st.sampled_from(PAIRS), count=st.integers(2, 12))
    def burst(self, pair: Pair, count: int) -> None:
        """A writer writes several tokens quickly and they all arrive."""
        for n in range(count):
            self.publish(pair, 1 + n % 2)
        self.deliver(pair[1], 3 * count)

    def receive(self, cmd: Command) -> None:
        pair = (cmd.stream_name, cmd.instance_name)  # type: ignore[attr-defined]
        if pair in self.from_now:
            # A "from now" pair starts at its first POSITION, or, read-only,
            # just before its first numeric RDATA.
            if isinstance(cmd, PositionCommand):
                self.from_now.discard(pair)
                self.excused_upto[pair] = cmd.new_token
            elif self.read_only and isinstance(cmd, RdataCommand) and cmd.token is not None:
                self.from_now.discard(pair)
                self.excused_upto[pair] = cmd.token - 1
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
        """Without a checkpoint store, a clean restart from the positions: what
        was completed but not processed may be completed again.  With one, a
        crash: the new client resumes from the last checkpoint saved, and at
        most one completed batch per stream lies past it."""
        if self.checkpoints is not None:
            resume = self.checkpoints.load() or {}
            start = None
        else:
            resume = start = self.client.positions()
        again_by_stream: dict[str, int] = {}
        for pair in PAIRS:
            done = resume.get(pair[0], {}).get(pair[1])
            again = [t for t in self.seen[pair] if done is None or t > done]
            history = self.writers[pair[1]].streams[pair[0]].history
            for token in again:
                self.seen_rows.difference_update(label(r) for r in history[token])
            self.seen[pair] = [t for t in self.seen[pair] if t not in again]
            again_by_stream[pair[0]] = again_by_stream.get(pair[0], 0) + len(again)
            if done is None:
                self.excused_upto.pop(pair, None)
        if self.checkpoints is not None and self.checkpoints.saved is not None:
            assert all(n <= 1 for n in again_by_stream.values()), again_by_stream
        self.held.clear()
        self.out.clear()
        self.failed.clear()
        self.new_client(start)
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
        checkpoints = [self.client.positions()]
        if self.checkpoints is not None and self.checkpoints.saved is not None:
            checkpoints.append(self.checkpoints.saved)
        for checkpoint in checkpoints:
            for pair in PAIRS:
                done = checkpoint.get(pair[0], {}).get(pair[1])
                if done is not None:
                    lost = self.unaccounted(pair, done)
                    assert not lost, (pair, done, lost)

    # ------------------------------------------------------------ the end

    def settle(self) -> None:
        for _ in range(1000):
            moved = self.drain()
            for stream in list(self.held):
                moved = True
                self.release(stream)
            while self.fetcher.requests:
                moved = True
                self.serve(self.fetcher.requests.pop(0), "full", 0)
            while self.io:
                moved = True
                self.complete(0, False)
            if self.clock.getDelayedCalls():
                moved = True
                self.clock.advance(60)
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
        if self.checkpoints is not None:
            assert self.checkpoints.saved == checkpoint


TestClientMachine = ClientMachine.TestCase
TestClientMachine.settings = settings(max_examples=300, stateful_step_count=80, deadline=None)
