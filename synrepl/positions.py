"""Stream positions: the bookkeeping that makes sure no row is missed.

Rule 1: everything that decides what a stream position means lives in this
module.  The Redis and HTTP adapters only move commands in and carry the
resulting actions out; they make no decision of their own.

Theory of operation
===================

:class:`StreamPositions` is a pure, synchronous state machine.  Commands go
in (:meth:`~StreamPositions.receive`, plus :meth:`~StreamPositions.fetched`,
:meth:`~StreamPositions.fetch_failed` and
:meth:`~StreamPositions.connection_lost` for what the adapters learn), and
each call returns the list of :class:`Event` objects it produced, in order.
It does no I/O, keeps no clock and calls nothing back.  One event,
:class:`FetchNeeded`, is an *action*: the adapter must fetch that range of
rows over HTTP and report the answer.

State is kept per *pair*: one stream, one writer instance.  A pair has:

- ``token``: how far we have everything that writer wrote to that stream,
  or None when we have never heard of the writer (nothing before its first
  ``POSITION`` is expected: a "from now" start);
- ``connected``: whether a ``POSITION`` from the writer has been processed
  on the current Redis connection, so that its RDATA can be trusted to
  follow on without a hole;
- a pending *batch*: rows of ``RDATA ... batch`` lines waiting for the
  writer's next numeric token on that stream;
- while a fetch is in flight: the fetch *target* and a *queue* of what the
  writer sent meanwhile.

The rules, for a pair whose token is ``cur``:

1. Commands from ``local_instance`` are our own echoes and streams outside
   ``streams`` are not ours: both are ignored (and counted).
2. RDATA for an unconnected pair is dropped: the ``POSITION`` that answers
   ``REPLICATE`` will reveal anything it carried.  :meth:`connection_lost`
   makes every pair unconnected and drops the pending batches, but keeps the
   tokens and lets fetches in flight finish.
3. ``RDATA`` with token ``batch`` is held; the writer's next numeric token
   for the stream completes the batch and all its rows are delivered
   together at that token (:class:`RowsReceived`).  A numeric token
   ``<= cur`` is a duplicate: dropped together with its batch.
4. ``POSITION prev new`` says the writer wrote nothing in ``(prev, new]``:

   - ``cur`` is None: take ``new``; connected (:class:`PositionAdvanced`).
   - on a monotonic stream, a connected pair with ``new <= cur`` learns
     nothing: the command is redundant and ignored.
   - ``prev <= cur <= new``: no hole; move to ``new`` (PositionAdvanced
     when that is a move), connected.
   - ``cur < prev``: rows in ``(cur, prev]`` were missed: emit
     ``FetchNeeded(cur, new)`` and start fetching, target ``new``.
   - ``cur > new``: on a resettable stream (:data:`RESETTABLE_STREAMS`)
     the writer restarted: :class:`StreamReset`, token ``new``.  On a
     monotonic stream the token never goes back: keep ``cur``.
     Connected either way.

   A ``POSITION`` that is processed also drops the pair's pending batch
   (a writer never sends one inside a batch unless it restarted mid-way,
   and then those rows come back through the fetch).
5. While a pair is fetching, its commands are queued: numeric RDATA as one
   entry carrying its whole batch, ``POSITION`` as itself.  The queue holds
   at most ``max_buffered`` rows (a POSITION counts as one).  When it would
   hold more, it is collapsed into one entry standing for its highest token
   X (on a resettable stream: its latest): a ``POSITION X X`` if it held a
   ``POSITION``, otherwise a "missed up to X" marker.  Replaying that entry
   later triggers the ordinary gap rule, so the forgotten rows are fetched
   again instead of lost.  A batch that grows past ``max_buffered`` rows is
   forgotten the same way: its completing RDATA at token T becomes a fetch
   of ``(cur, T]``.  So one pair never holds more than about twice
   ``max_buffered`` rows.
6. :meth:`fetched` delivers the rows above ``cur`` grouped by token
   (``RowsReceived(fetched=True)``).  A limited page moves the token to
   the page's end and asks for the next page; the last page moves it to the
   target, makes the pair connected (unless the connection was lost during
   the fetch) and replays the queue through these same rules.  A replayed
   entry may start a new fetch; the rest of the queue then waits for it.
7. :meth:`fetch_failed` emits :class:`GapUnfillable` for exactly the range
   still missing, moves the token past it (the loss is loud, never silent)
   and carries on as if the fetch had succeeded.
8. :meth:`wait_for` registers a waiter; :class:`PositionReached` comes out of
   whichever call first moves the pair's token to or past the awaited one.

Every time the token moves without rows being delivered (a POSITION, the
end of a fetch, a gap given up), a :class:`PositionAdvanced` says so, so a
consumer that tracks positions from events alone stays exact.

Differences from Synapse 1.163.2 (``synapse/replication/tcp/handler.py``):
batches and connectedness are kept per writer, not per stream (two writers'
batches may interleave on the wire); a fetch never blocks other pairs of
the same stream; while fetching, memory is bounded; a fetch that fails
is reported instead of retried for ever.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Hashable, Iterable, Iterator, Mapping, Sequence

import attrs

from synrepl.commands import Command, PositionCommand, RdataCommand
from synrepl.errors import SynreplError
from synrepl.streams import AnyRow

__all__ = (
    "StreamPositions",
    "Event",
    "RowsReceived",
    "FetchNeeded",
    "PositionAdvanced",
    "StreamReset",
    "GapUnfillable",
    "PositionReached",
    "Counters",
    "StateError",
    "RESETTABLE_STREAMS",
)

#: Streams whose writer restarts its tokens from scratch (they live in the
#: writer's memory, not in a database sequence).  On every other stream a
#: token never goes backwards, so Synapse discards a POSITION that is not
#: ahead of what it already has.
RESETTABLE_STREAMS: frozenset[str] = frozenset({"typing", "presence_federation", "federation"})


class StateError(SynreplError, ValueError):
    """The caller asked for something the position state does not allow.

    For example :meth:`StreamPositions.fetched` for a pair that is not
    fetching.  This is a bug in the calling code, never bad wire input.
    """


# ---------------------------------------------------------------- events


@attrs.frozen
class Event:
    """Base of everything :class:`StreamPositions` returns."""


@attrs.frozen
class RowsReceived(Event):
    """Every row ``writer`` wrote to ``stream`` at ``token``, in wire order.

    ``fetched`` is True when the rows came over HTTP (:meth:`~StreamPositions.fetched`)
    rather than as RDATA.
    """

    stream: str
    writer: str
    token: int
    rows: tuple[AnyRow, ...]
    fetched: bool


@attrs.frozen
class FetchNeeded(Event):
    """Action: fetch rows with ``from_token < token <= upto_token`` from ``writer``.

    Call ``get_repl_stream_updates`` on that instance, then report the page
    with :meth:`StreamPositions.fetched` (or the failure with
    :meth:`StreamPositions.fetch_failed`).  A pair has at most one fetch
    outstanding.
    """

    stream: str
    writer: str
    from_token: int
    upto_token: int


@attrs.frozen
class PositionAdvanced(Event):
    """Our token for (``stream``, ``writer``) moved to ``token`` without rows."""

    stream: str
    writer: str
    token: int


@attrs.frozen
class StreamReset(Event):
    """The writer of a resettable stream restarted: its token went back.

    Whatever a consumer derived from the stream (who is typing, ...) should
    be thrown away.
    """

    stream: str
    writer: str
    old_token: int
    new_token: int


@attrs.frozen
class GapUnfillable(Event):
    """Rows with ``from_token < token <= upto_token`` are lost for good.

    The fetch for them failed (``reason``); the token has moved past them.
    """

    stream: str
    writer: str
    from_token: int
    upto_token: int
    reason: str


@attrs.frozen
class PositionReached(Event):
    """The waiter registered under ``key`` is satisfied: the pair is at ``token``.

    ``token`` is where the pair now is, which may be past the awaited token.
    """

    key: Hashable
    stream: str
    writer: str
    token: int


@attrs.define
class Counters:
    """Running totals for metrics; they only ever increase."""

    #: Commands from ``local_instance``, ignored.
    own_echoes: int = 0
    #: Commands for streams outside ``streams``, ignored.
    ignored_streams: int = 0
    #: RDATA lines dropped because their pair was not connected.
    unconnected_dropped: int = 0
    #: RDATA tokens dropped because we already had them.
    duplicates_dropped: int = 0
    #: POSITIONs that could not tell us anything new.
    redundant_positions: int = 0
    #: POSITIONs with ``prev_token > new_token``, ignored.
    malformed_positions: int = 0
    #: Pending batches thrown away (by a POSITION or a lost connection).
    batches_dropped: int = 0
    #: Batches that grew past ``max_buffered`` rows and were refetched instead.
    batch_overflows: int = 0
    #: Fetch-time queues that hit ``max_buffered`` and were collapsed.
    buffer_overflows: int = 0
    #: FetchNeeded actions emitted (pages included).
    fetches: int = 0
    #: GapUnfillable events emitted.
    gaps_unfillable: int = 0
    #: StreamReset events emitted.
    resets: int = 0

    def as_dict(self) -> dict[str, int]:
        """Counter name -> value."""
        return attrs.asdict(self)


# ---------------------------------------------------------------- internal state


@attrs.frozen
class _Rows:
    """A queued numeric RDATA together with the batch it completed."""

    token: int
    rows: tuple[AnyRow, ...]


@attrs.frozen
class _Missed:
    """Stands for rows up to ``token`` that we received but could not keep."""

    token: int


_Entry = _Rows | _Missed | PositionCommand


@attrs.define
class _Fetch:
    target: int
    #: Whether finishing the fetch makes the pair connected: False once the
    #: connection it was started on is gone.
    connect: bool
    queue: deque[_Entry] = attrs.Factory(deque)
    #: Rows held in ``queue`` (a POSITION or stand-in counts as one).
    size: int = 0


@attrs.define
class _Pair:
    stream: str
    writer: str
    resettable: bool
    token: int | None = None
    connected: bool = False
    batch: list[AnyRow] = attrs.Factory(list)
    #: The pending batch overflowed: its rows were forgotten.
    batch_lost: bool = False
    fetch: _Fetch | None = None
    waiters: dict[Hashable, int] = attrs.Factory(dict)


def _entry_token(entry: _Entry) -> int:
    if isinstance(entry, PositionCommand):
        return entry.new_token
    return entry.token


def _entry_size(entry: _Entry) -> int:
    return len(entry.rows) if isinstance(entry, _Rows) else 1


# ---------------------------------------------------------------- the machine


class StreamPositions:
    """Per (stream, writer) positions, batches, gaps and waiters; no I/O.

    Args:
        local_instance: our own instance name; its commands are echoes and
            are ignored.
        streams: the streams to track; None tracks every stream seen.
        start: checkpointed tokens ``{stream: {writer: token}}`` (as
            :meth:`positions` returns them) to resume from.  A writer not
            listed starts "from now" at its first POSITION.
        writers: the expected writers of some streams, for
            :meth:`persisted_upto`.
        resettable_streams: streams whose tokens may go back when their
            writer restarts; defaults to :data:`RESETTABLE_STREAMS`.
        max_buffered: the most rows one pair's fetch-time queue, and one
            pending batch, may hold (see rule 5 above).

    Raises:
        ValueError: ``max_buffered`` is below 1.
    """

    def __init__(
        self,
        *,
        local_instance: str | None = None,
        streams: Collection[str] | None = None,
        start: Mapping[str, Mapping[str, int]] | None = None,
        writers: Mapping[str, Sequence[str]] | None = None,
        resettable_streams: Collection[str] | None = None,
        max_buffered: int = 10_000,
    ) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be at least 1, not {max_buffered}")
        self.local_instance = local_instance
        self.max_buffered = max_buffered
        self.counters = Counters()
        self._tracked: frozenset[str] | None = None if streams is None else frozenset(streams)
        self._resettable = frozenset(
            RESETTABLE_STREAMS if resettable_streams is None else resettable_streams
        )
        self._writers: dict[str, tuple[str, ...]] = {
            stream: tuple(names) for stream, names in (writers or {}).items()
        }
        self._pairs: dict[str, dict[str, _Pair]] = {}
        self._waiting: dict[Hashable, _Pair] = {}
        for stream, tokens in (start or {}).items():
            for writer, token in tokens.items():
                pair = self._pair(stream, writer)
                if pair is not None:
                    pair.token = token

    # ------------------------------------------------------------ queries

    def current_token(self, stream: str, writer: str) -> int | None:
        """How far we have every row ``writer`` wrote to ``stream`` (None: unknown)."""
        pair = self._pairs.get(stream, {}).get(writer)
        return None if pair is None else pair.token

    def is_connected(self, stream: str, writer: str) -> bool:
        """Whether RDATA from ``writer`` on ``stream`` is currently accepted."""
        pair = self._pairs.get(stream, {}).get(writer)
        return pair is not None and pair.connected

    def is_fetching(self, stream: str, writer: str) -> bool:
        """Whether a fetch for the pair is in flight (its commands are queued)."""
        pair = self._pairs.get(stream, {}).get(writer)
        return pair is not None and pair.fetch is not None

    def persisted_upto(self, stream: str) -> int | None:
        """The lowest token over the stream's writers: everything up to it is here.

        The writers are the ``writers`` given for the stream, else every
        writer seen on it; ``local_instance`` is left out (a process knows
        its own position better than we do).  None when a writer's token is
        unknown, or no writer is known.
        """
        pairs = self._pairs.get(stream, {})
        names: Iterable[str] = self._writers.get(stream, pairs)
        tokens = []
        for name in names:
            if name == self.local_instance:
                continue
            pair = pairs.get(name)
            if pair is None or pair.token is None:
                return None
            tokens.append(pair.token)
        return min(tokens) if tokens else None

    def positions(self) -> dict[str, dict[str, int]]:
        """Every known token, ``{stream: {writer: token}}``: a checkpoint for ``start``."""
        out: dict[str, dict[str, int]] = {}
        for stream, pairs in self._pairs.items():
            tokens = {name: p.token for name, p in pairs.items() if p.token is not None}
            if tokens:
                out[stream] = tokens
        return out

    # ------------------------------------------------------------ waiters

    def wait_for(self, stream: str, writer: str, token: int, key: Hashable) -> bool:
        """Ask to be told when ``writer``'s ``stream`` reaches ``token``.

        Returns:
            True when it already has (nothing is registered); else False, and
            a :class:`PositionReached` with ``key`` comes out later.  Our own
            instance's positions count as reached at once.

        Raises:
            StateError: the stream is not tracked, or ``key`` is already
                waiting.
        """
        if writer == self.local_instance:
            return True
        pair = self._pair(stream, writer)
        if pair is None:
            raise StateError(f"stream {stream!r} is not tracked, so it never moves")
        if pair.token is not None and pair.token >= token:
            return True
        if key in self._waiting:
            raise StateError(f"a waiter with key {key!r} is already registered")
        pair.waiters[key] = token
        self._waiting[key] = pair
        return False

    def cancel_wait(self, key: Hashable) -> bool:
        """Forget the waiter ``key`` (say, on timeout).  False if there was none."""
        pair = self._waiting.pop(key, None)
        if pair is None:
            return False
        del pair.waiters[key]
        return True

    # ------------------------------------------------------------ inputs

    def receive(self, cmd: Command) -> list[Event]:
        """Take one command from the wire; anything but RDATA and POSITION gives []."""
        if isinstance(cmd, RdataCommand):
            return self._receive_rdata(cmd)
        if isinstance(cmd, PositionCommand):
            return self._receive_position(cmd)
        return []

    def fetched(
        self,
        stream: str,
        writer: str,
        updates: Sequence[tuple[int, AnyRow]],
        upto_token: int,
        limited: bool,
    ) -> list[Event]:
        """Report one page answering the pair's outstanding :class:`FetchNeeded`.

        Args:
            updates: ``(token, row)`` pairs as the writer returned them.
            upto_token: the page's end, from the response.
            limited: whether the writer has more rows before the target.

        Raises:
            StateError: the pair is not fetching.
        """
        pair = self._fetching(stream, writer, "fetched")
        fetch = pair.fetch
        assert fetch is not None and pair.token is not None
        out: list[Event] = []
        start = pair.token
        for token, rows in _by_token(updates):
            if token > pair.token:
                self._deliver(pair, token, rows, True, out)
        if limited and max(pair.token, upto_token) < fetch.target:
            self._advance(pair, upto_token, out)
            if pair.token <= start:
                self._give_up(pair, "the writer returned a limited page without progress", out)
            else:
                self._request(pair, fetch.target, out)
            return out
        self._advance(pair, fetch.target, out)
        self._finish(pair, out)
        return out

    def fetch_failed(self, stream: str, writer: str, reason: str) -> list[Event]:
        """Report that the pair's outstanding fetch cannot be done.

        The rows still missing are reported in a :class:`GapUnfillable` and
        skipped.

        Raises:
            StateError: the pair is not fetching.
        """
        pair = self._fetching(stream, writer, "fetch_failed")
        out: list[Event] = []
        self._give_up(pair, reason, out)
        return out

    def connection_lost(self) -> list[Event]:
        """The Redis connection went away: every pair is unconnected until its next POSITION.

        Pending batches and fetch-time queues are dropped (they are what the
        new connection's POSITIONs will account for); tokens, waiters and
        fetches in flight are kept.  Returns [] (no event follows from it).
        """
        for pairs in self._pairs.values():
            for pair in pairs.values():
                pair.connected = False
                self._drop_batch(pair)
                if pair.fetch is not None:
                    pair.fetch.connect = False
                    pair.fetch.queue.clear()
                    pair.fetch.size = 0
        return []

    # ------------------------------------------------------------ wire commands

    def _pair(self, stream: str, writer: str) -> _Pair | None:
        pairs = self._pairs.get(stream)
        if pairs is None:
            if self._tracked is not None and stream not in self._tracked:
                return None
            pairs = self._pairs[stream] = {}
        pair = pairs.get(writer)
        if pair is None:
            pair = pairs[writer] = _Pair(stream, writer, stream in self._resettable)
        return pair

    def _pair_of(self, cmd: RdataCommand | PositionCommand) -> _Pair | None:
        """The pair a command is about, or None (counted) for our own echoes
        and streams we do not follow."""
        if cmd.instance_name == self.local_instance:
            self.counters.own_echoes += 1
            return None
        pair = self._pair(cmd.stream_name, cmd.instance_name)
        if pair is None:
            self.counters.ignored_streams += 1
        return pair

    def _receive_rdata(self, cmd: RdataCommand) -> list[Event]:
        pair = self._pair_of(cmd)
        if pair is None:
            return []
        token = cmd.token
        if pair.fetch is None and not pair.connected:
            self.counters.unconnected_dropped += 1
            if token is not None:
                self._drop_batch(pair)
            return []
        if token is None:
            if pair.batch_lost:
                pass
            elif len(pair.batch) < self.max_buffered:
                pair.batch.append(cmd.row)
            else:
                self.counters.batch_overflows += 1
                pair.batch.clear()
                pair.batch_lost = True
            return []
        entry: _Entry
        if pair.batch_lost:
            pair.batch_lost = False
            entry = _Missed(token)
        elif pair.batch:
            pair.batch.append(cmd.row)
            entry = _Rows(token, tuple(pair.batch))
            pair.batch.clear()
        else:
            entry = _Rows(token, (cmd.row,))
        if pair.fetch is not None:
            self._enqueue(pair, entry)
            return []
        out: list[Event] = []
        self._apply(pair, entry, out)
        return out

    def _receive_position(self, cmd: PositionCommand) -> list[Event]:
        pair = self._pair_of(cmd)
        if pair is None:
            return []
        if cmd.prev_token > cmd.new_token:
            self.counters.malformed_positions += 1
            return []
        if pair.fetch is not None:
            self._drop_batch(pair)
            self._enqueue(pair, cmd)
            return []
        if self._redundant(pair, cmd):
            return []
        self._drop_batch(pair)
        out: list[Event] = []
        self._position(pair, cmd, out)
        return out

    # ------------------------------------------------------------ the rules

    def _apply(self, pair: _Pair, entry: _Entry, out: list[Event]) -> None:
        """Apply one live or replayed entry to a pair that is not fetching."""
        if isinstance(entry, _Rows):
            if not pair.connected:
                self.counters.unconnected_dropped += len(entry.rows)
            elif pair.token is not None and entry.token <= pair.token:
                self.counters.duplicates_dropped += 1
            else:
                self._deliver(pair, entry.token, entry.rows, False, out)
        elif isinstance(entry, _Missed):
            if pair.token is not None and entry.token > pair.token:
                self._start_fetch(pair, entry.token, pair.connected, out)
        elif not self._redundant(pair, entry):
            self._position(pair, entry, out)

    def _redundant(self, pair: _Pair, cmd: PositionCommand) -> bool:
        if (
            pair.connected
            and not pair.resettable
            and pair.token is not None
            and cmd.new_token <= pair.token
        ):
            self.counters.redundant_positions += 1
            return True
        return False

    def _position(self, pair: _Pair, cmd: PositionCommand, out: list[Event]) -> None:
        cur = pair.token
        new = cmd.new_token
        if cur is None:
            pair.connected = True
            self._advance(pair, new, out)
        elif cur < cmd.prev_token:
            self._start_fetch(pair, new, True, out)
        elif cur <= new:
            pair.connected = True
            self._advance(pair, new, out)
        else:
            pair.connected = True
            if pair.resettable:
                self.counters.resets += 1
                pair.token = new
                out.append(StreamReset(pair.stream, pair.writer, cur, new))

    def _enqueue(self, pair: _Pair, entry: _Entry) -> None:
        fetch = pair.fetch
        assert fetch is not None
        queue = fetch.queue
        queue.append(entry)
        fetch.size += _entry_size(entry)
        if fetch.size <= self.max_buffered:
            return
        # Forget the queue, but keep its furthest token so that replaying the
        # stand-in fetches everything it held.
        self.counters.buffer_overflows += 1
        if pair.resettable:
            upto = _entry_token(entry)
        else:
            upto = max(_entry_token(e) for e in queue)
        had_position = any(isinstance(e, PositionCommand) for e in queue)
        queue.clear()
        stand_in: _Entry
        if had_position:
            stand_in = PositionCommand(pair.stream, pair.writer, upto, upto)
        else:
            stand_in = _Missed(upto)
        queue.append(stand_in)
        fetch.size = 1

    def _start_fetch(self, pair: _Pair, upto: int, connect: bool, out: list[Event]) -> None:
        pair.fetch = _Fetch(upto, connect)
        pair.connected = False
        self._request(pair, upto, out)

    def _request(self, pair: _Pair, upto: int, out: list[Event]) -> None:
        assert pair.token is not None
        self.counters.fetches += 1
        out.append(FetchNeeded(pair.stream, pair.writer, pair.token, upto))

    def _give_up(self, pair: _Pair, reason: str, out: list[Event]) -> None:
        fetch = pair.fetch
        assert fetch is not None and pair.token is not None
        if pair.token < fetch.target:
            self.counters.gaps_unfillable += 1
            out.append(GapUnfillable(pair.stream, pair.writer, pair.token, fetch.target, reason))
            self._advance(pair, fetch.target, out)
        self._finish(pair, out)

    def _finish(self, pair: _Pair, out: list[Event]) -> None:
        fetch = pair.fetch
        assert fetch is not None
        pair.fetch = None
        pair.connected = fetch.connect
        queue = fetch.queue
        while queue:
            self._apply(pair, queue.popleft(), out)
            if pair.fetch is not None:
                # A replayed entry started another fetch: the rest waits for it.
                pair.fetch.queue.extend(queue)
                pair.fetch.size = sum(map(_entry_size, queue))
                return

    def _fetching(self, stream: str, writer: str, what: str) -> _Pair:
        pair = self._pairs.get(stream, {}).get(writer)
        if pair is None or pair.fetch is None:
            raise StateError(f"{what}() for {stream}/{writer}, which has no fetch in flight")
        return pair

    def _drop_batch(self, pair: _Pair) -> None:
        if pair.batch or pair.batch_lost:
            self.counters.batches_dropped += 1
            pair.batch.clear()
            pair.batch_lost = False

    def _deliver(
        self, pair: _Pair, token: int, rows: tuple[AnyRow, ...], fetched: bool, out: list[Event]
    ) -> None:
        pair.token = token
        out.append(RowsReceived(pair.stream, pair.writer, token, rows, fetched))
        if pair.waiters:
            self._wake(pair, out)

    def _advance(self, pair: _Pair, token: int, out: list[Event]) -> None:
        if pair.token is None or token > pair.token:
            pair.token = token
            out.append(PositionAdvanced(pair.stream, pair.writer, token))
            if pair.waiters:
                self._wake(pair, out)

    def _wake(self, pair: _Pair, out: list[Event]) -> None:
        token = pair.token
        assert token is not None
        done = [key for key, wanted in pair.waiters.items() if wanted <= token]
        for key in done:
            del pair.waiters[key]
            del self._waiting[key]
            out.append(PositionReached(key, pair.stream, pair.writer, token))


def _by_token(updates: Sequence[tuple[int, AnyRow]]) -> Iterator[tuple[int, tuple[AnyRow, ...]]]:
    """Group ``(token, row)`` updates by token, in token order, rows in given order."""
    ordered = sorted(updates, key=lambda update: update[0])
    i = 0
    while i < len(ordered):
        token = ordered[i][0]
        j = i
        while j < len(ordered) and ordered[j][0] == token:
            j += 1
        yield token, tuple(row for _, row in ordered[i:j])
        i = j
