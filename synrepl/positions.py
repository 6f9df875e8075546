"""Stream positions: the bookkeeping that makes sure no row is missed.

Rule 1: everything that decides what a stream position means lives in this
module.  The Redis and HTTP adapters only move commands in and carry the
resulting actions out; they make no decision of their own.  What happens to
rows after they are known (queues, handlers, checkpoints) is
:mod:`synrepl.delivery`'s job.

Theory of operation
===================

:class:`StreamPositions` is a pure, synchronous state machine.  Commands go
in (:meth:`~StreamPositions.receive`, plus :meth:`~StreamPositions.fetched`,
:meth:`~StreamPositions.fetch_failed`, :meth:`~StreamPositions.resume` and
:meth:`~StreamPositions.connection_lost` for what the adapters learn), and
each call returns the list of :class:`Event` objects it produced, in order.
It does no I/O and keeps no clock.  One event, :class:`FetchNeeded`, is an
*action*: the adapter must fetch that range of rows over HTTP and report the
answer.

State is kept per *pair*: one stream, one writer instance.  A pair has:

- ``token``: how far every row that writer wrote to that stream has been
  handed on (as :class:`RowsReceived`, or skipped by a reported gap), or
  None when we have never heard of the writer (nothing before its first
  ``POSITION`` is expected: a "from now" start);
- ``connected``: whether a ``POSITION`` from the writer has been processed
  on the current Redis connection, so that its RDATA can be trusted to
  follow on without a hole;
- a pending *batch*: rows of ``RDATA ... batch`` lines waiting for the
  writer's next numeric token on that stream;
- while it catches up: a *fetch* with its *target*, a flag saying whether a
  request is in flight, and a *queue* of what the writer sent meanwhile.

The rules, for a pair whose token is ``cur``:

1. Commands from ``local_instance`` are our own echoes and streams outside
   ``streams`` are not ours: both are ignored (and counted).
2. RDATA for an unconnected pair is dropped: the ``POSITION`` that answers
   ``REPLICATE`` will reveal anything it carried.  :meth:`connection_lost`
   makes every pair unconnected and drops the pending batches, but keeps the
   tokens and lets fetches finish.

   2b. With ``connect_on_rdata`` (a client that sends no REPLICATE, so may
   never see a POSITION), a numeric RDATA at T instead connects the pair:
   everything in ``(cur, T]`` is fetched, T included, since its batch may
   have begun before we listened; a "from now" pair starts at ``T - 1``, so
   the first token whose RDATA reaches us is delivered whole.  A pair of a
   writer nothing can be fetched from connects at T, skipping it (counted).
3. ``RDATA`` with token ``batch`` is held; the writer's next numeric token
   for the stream completes the batch and all its rows are handed on
   together at that token (:class:`RowsReceived`).  A numeric token
   ``<= cur`` is a duplicate: dropped together with its batch.
4. ``POSITION prev new`` says the writer wrote nothing in ``(prev, new]``:

   - ``cur`` is None: take ``new``; connected (:class:`PositionAdvanced`).
   - connected, ``new == cur``: the command is redundant and ignored.
   - ``prev <= cur <= new``: no hole; move to ``new`` (PositionAdvanced
     when that is a move), connected.
   - ``cur < prev``: rows in ``(cur, prev]`` were missed: fetch
     ``(cur, new]``.
   - ``cur > new``: the writer is behind us.  On a resettable stream
     (:data:`RESETTABLE_STREAMS`) it restarted: :class:`StreamReset`, token
     ``new``.  On a monotonic stream tokens never go back, so our token is
     wrong (a checkpoint kept across a database restore, a forged command):
     :class:`WriterBehind`, loudly, and with ``trust_writer`` (the default)
     the token becomes ``new``, since the writer's history is the truth.
     Connected either way.

   A ``POSITION`` that is processed also drops the pair's pending batch
   (a writer never sends one inside a batch unless it restarted mid-way,
   and then those rows come back through the fetch).
5. A fetch asks for ``(cur, target]``, a page at a time.  While a request
   is in flight the pair's commands are queued: numeric RDATA as one entry
   carrying its whole batch, ``POSITION`` as itself.  The queue holds at
   most ``max_buffered`` rows (a POSITION counts as one).  When it would
   hold more, it is collapsed into one entry standing for its highest token
   X (on a resettable stream: its latest): a ``POSITION X X`` if it held a
   ``POSITION``, otherwise a "missed up to X" marker.  Replaying that entry
   later triggers the ordinary gap rule, so the forgotten rows are fetched
   again instead of lost.  A batch that grows past ``max_buffered`` rows is
   forgotten the same way: its completing RDATA at token T becomes a fetch
   of ``(cur, T]``.  The target never changes while a request is in
   flight, so an answer always covers exactly what was asked.
6. The delivery side's :class:`Budget` may refuse live rows when its queue
   is full.  The pair then starts a fetch *waiting for room*, with the
   refused token as target: no request yet, and what the writer sends
   meanwhile only raises the target (on a monotonic stream, while nothing
   is queued) instead of being kept.  :meth:`resume` sends the waiting
   requests once the budget wants pages again; the next page of a limited
   answer also waits until then.  So memory stays bounded however slow the
   handlers, and nothing is lost: the rows come back from the writer.
7. :meth:`fetched` hands on the rows in ``(cur, target]`` grouped by token
   (``RowsReceived(fetched=True)``).  A limited page moves the token to the
   page's end and asks for the next page; the last page moves it to the
   target, makes the pair connected (if a ``POSITION`` was processed on the
   current connection) and replays the queue through these same rules.  A
   replayed entry may start a new fetch; the rest of the queue then waits
   for it.
8. :meth:`fetch_failed` emits :class:`GapUnfillable` for exactly the range
   still missing, moves the token past it (the loss is loud, never silent)
   and carries on as if the fetch had succeeded.
9. A writer that the configuration does not name (``fetchable``) cannot be
   asked for rows.  Its commands are counted and its rows handed on, never
   refused; a gap one of its POSITIONs reveals is skipped (counted), not
   reported as lost.  The first command of such a pair yields
   :class:`UnnamedWriter`.

Every time the token moves without rows being handed on (a POSITION, the
end of a fetch, a gap given up), a :class:`PositionAdvanced` says so, so a
consumer that tracks positions from events alone stays exact.

Differences from Synapse 1.163.2 (``synapse/replication/tcp/handler.py``):
batches and connectedness are kept per writer, not per stream (two writers'
batches may interleave on the wire); a fetch never blocks other pairs of
the same stream; memory is bounded; a fetch that fails is reported instead
of retried for ever; a writer behind us is reported.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import attrs

from synrepl._builders import fast_constructor
from synrepl.commands import Command, PositionCommand, RdataCommand
from synrepl.errors import SynreplError
from synrepl.streams import AnyRow

__all__ = (
    "StreamPositions",
    "Budget",
    "Event",
    "RowsReceived",
    "FetchNeeded",
    "PositionAdvanced",
    "StreamReset",
    "WriterBehind",
    "GapUnfillable",
    "UnnamedWriter",
    "Counters",
    "StateError",
    "RESETTABLE_STREAMS",
    "lowest_token",
)

#: Streams whose writer restarts its tokens from scratch (they live in the
#: writer's memory, not in a database sequence).  On every other stream a
#: token never goes backwards.
RESETTABLE_STREAMS: frozenset[str] = frozenset({"typing", "presence_federation", "federation"})


class StateError(SynreplError, ValueError):
    """The caller asked for something the position state does not allow.

    For example :meth:`StreamPositions.fetched` for a pair that has no
    request in flight.  This is a bug in the calling code, never bad wire
    input.
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


#: RowsReceived(...) for checked values, a batch per token: see synrepl._builders.
_rows_received = fast_constructor(RowsReceived, "synrepl.positions")


@attrs.frozen
class FetchNeeded(Event):
    """Action: fetch rows with ``from_token < token <= upto_token`` from ``writer``.

    Call ``get_repl_stream_updates`` on that instance, then report the page
    with :meth:`StreamPositions.fetched` (or the failure with
    :meth:`StreamPositions.fetch_failed`).  A pair has at most one request
    in flight.
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
class WriterBehind(Event):
    """A writer's POSITION is below our token on a stream that never goes back.

    Our token was wrong: a checkpoint kept across a database restore, or a
    forged command moved it ahead.  ``trusted`` says whether the token was
    moved back to ``new_token`` (the default policy) or kept at ``old_token``.
    """

    stream: str
    writer: str
    old_token: int
    new_token: int
    trusted: bool


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
class UnnamedWriter(Event):
    """The first command from a writer the configuration does not name.

    Its rows are handed on, but nothing can be fetched from it, so a gap it
    reveals is skipped.  Add it to ``instance_map`` to have gaps filled.
    """

    stream: str
    writer: str


@attrs.define
class Counters:
    """Running totals for metrics; they only ever increase."""

    #: Commands from ``local_instance``, ignored.
    own_echoes: int = 0
    #: Commands for streams outside ``streams``, ignored.
    ignored_streams: int = 0
    #: RDATA lines dropped because their pair was not connected.
    unconnected_dropped: int = 0
    #: Pairs connected at an RDATA (rule 2b), not at a POSITION.
    rdata_connects: int = 0
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
    #: Live rows the delivery side had no room for, fetched again later.
    overflows: int = 0
    #: FetchNeeded actions emitted (pages included).
    fetches: int = 0
    #: GapUnfillable events emitted.
    gaps_unfillable: int = 0
    #: StreamReset events emitted.
    resets: int = 0
    #: WriterBehind events emitted.
    writers_behind: int = 0
    #: RDATA and POSITION commands from writers the configuration does not name.
    unnamed_writer_commands: int = 0
    #: Gaps revealed by such writers, skipped because nothing can be fetched.
    unnamed_writer_gaps: int = 0

    def as_dict(self) -> dict[str, int]:
        """Counter name -> value."""
        return attrs.asdict(self)


class Budget(Protocol):
    """The delivery side's account of rows held for the handlers (rule 6)."""

    def reserve(self, stream: str, rows: int, refusable: bool) -> bool:
        """Take room for ``rows`` rows of ``stream``; False refuses them.

        Rows that are not ``refusable`` (fetched pages, writers nothing can be
        fetched from) must always be taken.
        """
        ...

    def wants_pages(self, stream: str) -> bool:
        """Whether a fetch for ``stream`` may ask for a page now."""
        ...


class _Unbounded:
    """The budget of a StreamPositions used on its own: room for everything."""

    def reserve(self, stream: str, rows: int, refusable: bool) -> bool:
        return True

    def wants_pages(self, stream: str) -> bool:
        return True


def lowest_token(
    tokens: Mapping[str, int | None], expected: Iterable[str] | None, local: str | None
) -> int | None:
    """The lowest of ``tokens`` over the ``expected`` writers (default: all known).

    ``local`` is left out (a process knows its own position better).  None
    when an expected writer has no token, or no writer is known.
    """
    lowest: int | None = None
    for name in tokens if expected is None else expected:
        if name == local:
            continue
        token = tokens.get(name)
        if token is None:
            return None
        lowest = token if lowest is None else min(lowest, token)
    return lowest


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
    #: connection it was started on is gone, True again once a POSITION of
    #: the new connection is absorbed (rule 6).
    connect: bool
    #: A request is out; otherwise the fetch waits for the budget (rule 6).
    in_flight: bool = False
    queue: deque[_Entry] = attrs.Factory(deque)
    #: Rows held in ``queue`` (a POSITION or stand-in counts as one).
    size: int = 0


@attrs.define
class _Pair:
    stream: str
    writer: str
    resettable: bool
    fetchable: bool
    token: int | None = None
    connected: bool = False
    batch: list[AnyRow] = attrs.Factory(list)
    #: The pending batch overflowed: its rows were forgotten.
    batch_lost: bool = False
    fetch: _Fetch | None = None
    #: A command of the writer was received (a start map alone does not count).
    heard: bool = False


def _entry_token(entry: _Entry) -> int:
    if isinstance(entry, PositionCommand):
        return entry.new_token
    return entry.token


def _entry_size(entry: _Entry) -> int:
    return len(entry.rows) if isinstance(entry, _Rows) else 1


# ---------------------------------------------------------------- the machine


class StreamPositions:
    """Per (stream, writer) positions, batches and gaps; no I/O.

    Args:
        local_instance: our own instance name; its commands are echoes and
            are ignored.
        streams: the streams to track; None tracks every stream seen.
        start: checkpointed tokens ``{stream: {writer: token}}`` (as
            :meth:`positions` returns them) to resume from.  A writer not
            listed starts "from now" at its first POSITION.
        writers: the expected writers of some streams, for
            :meth:`persisted_upto`.
        fetchable: the writers rows can be fetched from (those the
            configuration names); None: every writer (rule 9).
        resettable_streams: streams whose tokens may go back when their
            writer restarts; defaults to :data:`RESETTABLE_STREAMS`.
        trust_writer: on a writer behind us (rule 4), move our token back to
            the writer's (True) or keep ours (False).
        connect_on_rdata: connect a pair at its first numeric RDATA too, not
            only at a POSITION (rule 2b): for clients that send no REPLICATE.
        max_buffered: the most rows one pair's fetch-time queue, and one
            pending batch, may hold (rule 5).
        budget: the delivery side's account (rule 6); None: unbounded.

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
        fetchable: Collection[str] | None = None,
        resettable_streams: Collection[str] | None = None,
        trust_writer: bool = True,
        connect_on_rdata: bool = False,
        max_buffered: int = 10_000,
        budget: Budget | None = None,
    ) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be at least 1, not {max_buffered}")
        self.local_instance = local_instance
        self.max_buffered = max_buffered
        self.trust_writer = trust_writer
        self.connect_on_rdata = connect_on_rdata
        self.counters = Counters()
        self._budget: Budget = budget if budget is not None else _Unbounded()
        self._tracked: frozenset[str] | None = None if streams is None else frozenset(streams)
        self._fetchable: frozenset[str] | None = None if fetchable is None else frozenset(fetchable)
        self._resettable = frozenset(
            RESETTABLE_STREAMS if resettable_streams is None else resettable_streams
        )
        self._writers: dict[str, tuple[str, ...]] = {
            stream: tuple(names) for stream, names in (writers or {}).items()
        }
        self._pairs: dict[str, dict[str, _Pair]] = {}
        #: Fetches waiting for room, by stream, in the order they began to wait.
        self._waiting: dict[str, dict[str, _Pair]] = {}
        for stream, tokens in (start or {}).items():
            for writer, token in tokens.items():
                pair = self._pair(stream, writer)
                if pair is not None:
                    pair.token = token

    # ------------------------------------------------------------ queries

    def current_token(self, stream: str, writer: str) -> int | None:
        """How far every row ``writer`` wrote to ``stream`` was handed on (None: unknown)."""
        pair = self._pairs.get(stream, {}).get(writer)
        return None if pair is None else pair.token

    def is_connected(self, stream: str, writer: str) -> bool:
        """Whether RDATA from ``writer`` on ``stream`` is currently accepted."""
        pair = self._pairs.get(stream, {}).get(writer)
        return pair is not None and pair.connected

    def is_fetching(self, stream: str, writer: str) -> bool:
        """Whether the pair is catching up (its commands are queued or absorbed)."""
        pair = self._pairs.get(stream, {}).get(writer)
        return pair is not None and pair.fetch is not None

    def is_requesting(self, stream: str, writer: str) -> bool:
        """Whether a request for the pair is in flight (a FetchNeeded is unanswered)."""
        pair = self._pairs.get(stream, {}).get(writer)
        return pair is not None and pair.fetch is not None and pair.fetch.in_flight

    def is_waiting(self, stream: str) -> bool:
        """Whether a fetch for ``stream`` waits for the budget (see :meth:`resume`)."""
        return stream in self._waiting

    @property
    def waiting_streams(self) -> Mapping[str, object]:
        """The streams with a fetch waiting for the budget, as a live view
        (``stream in view`` is :meth:`is_waiting` without the call)."""
        return self._waiting

    def persisted_upto(self, stream: str) -> int | None:
        """The lowest token over the stream's writers: everything up to it is here.

        The writers are the ``writers`` given for the stream, else every
        writer seen on it; ``local_instance`` is left out.  None when a
        writer's token is unknown, or no writer is known.
        """
        pairs = self._pairs.get(stream, {})
        tokens = {name: pair.token for name, pair in pairs.items()}
        return lowest_token(tokens, self._writers.get(stream), self.local_instance)

    def positions(self) -> dict[str, dict[str, int]]:
        """Every known token, ``{stream: {writer: token}}``: a checkpoint for ``start``."""
        out: dict[str, dict[str, int]] = {}
        for stream, pairs in self._pairs.items():
            tokens = {name: p.token for name, p in pairs.items() if p.token is not None}
            if tokens:
                out[stream] = tokens
        return out

    def wire_positions(self) -> dict[str, dict[str, int]]:
        """The newest token known of each writer, ``{stream: {writer: token}}``:
        its position, or the target of a fetch under way (what the writer
        announced, whether or not the rows are in yet)."""
        out: dict[str, dict[str, int]] = {}
        for stream, pairs in self._pairs.items():
            tokens: dict[str, int] = {}
            for name, p in pairs.items():
                known = [t for t in (p.token, p.fetch.target if p.fetch else None) if t is not None]
                if known:
                    tokens[name] = max(known)
            if tokens:
                out[stream] = tokens
        return out

    # ------------------------------------------------------------ inputs

    def receive(self, cmd: Command) -> list[Event]:
        """Take one command from the wire; anything but RDATA and POSITION gives []."""
        if isinstance(cmd, RdataCommand):
            return self.receive_rdata(cmd)
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
            StateError: the pair has no request in flight.
        """
        pair = self._requesting(stream, writer, "fetched")
        fetch = pair.fetch
        assert fetch is not None and pair.token is not None
        fetch.in_flight = False
        out: list[Event] = []
        start = pair.token
        target = fetch.target
        for token, rows in _by_token(updates):
            if start < token <= target:
                self._deliver(pair, token, rows, True, out)
        if limited and max(pair.token, upto_token) < target:
            self._advance(pair, upto_token, out)
            if pair.token <= start:
                self._give_up(pair, "the writer returned a limited page without progress", out)
            else:
                self._request(pair, out)
            return out
        self._advance(pair, target, out)
        self._finish(pair, out)
        return out

    def fetch_failed(self, stream: str, writer: str, reason: str) -> list[Event]:
        """Report that the pair's outstanding fetch cannot be done.

        The rows still missing are reported in a :class:`GapUnfillable` and
        skipped.

        Raises:
            StateError: the pair has no request in flight.
        """
        pair = self._requesting(stream, writer, "fetch_failed")
        assert pair.fetch is not None
        pair.fetch.in_flight = False
        out: list[Event] = []
        self._give_up(pair, reason, out)
        return out

    def resume(self, stream: str) -> list[Event]:
        """Send the requests of ``stream`` that wait for room, if the budget wants them."""
        out: list[Event] = []
        waiting = self._waiting.get(stream)
        while waiting and self._budget.wants_pages(stream):
            writer = next(iter(waiting))
            self._request(waiting[writer], out)
        return out

    def seed(self, positions: Mapping[str, Mapping[str, int]]) -> list[Event]:
        """Positions the writers are known to have reached, read from Synapse's
        database (or a checkpoint loaded late).

        A writer we have no token for starts there (a "from now" start, as a
        :class:`PositionAdvanced`); one we are behind is fetched up to it over
        HTTP without waiting for its next traffic.  Neither connects the pair:
        that still takes the writer's own POSITION or RDATA on the current
        connection.
        """
        out: list[Event] = []
        for stream, tokens in positions.items():
            for writer, token in tokens.items():
                pair = self._pair(stream, writer)
                if pair is None or pair.fetch is not None:
                    continue
                if pair.token is None:
                    self._advance(pair, token, out)
                elif pair.token < token and pair.fetchable:
                    self._start_fetch(pair, token, pair.connected, out)
        return out

    def connection_lost(self) -> list[Event]:
        """The Redis connection went away: every pair is unconnected until its next POSITION.

        Pending batches and fetch-time queues are dropped (they are what the
        new connection's POSITIONs will account for); tokens and fetches are
        kept.  Returns [] (no event follows from it).
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
            fetchable = self._fetchable is None or writer in self._fetchable
            pair = _Pair(stream, writer, stream in self._resettable, fetchable)
            pairs[writer] = pair
        return pair

    def _pair_of(self, cmd: RdataCommand | PositionCommand, out: list[Event]) -> _Pair | None:
        """The pair a command is about, or None (counted) for our own echoes
        and streams we do not follow."""
        if cmd.instance_name == self.local_instance:
            self.counters.own_echoes += 1
            return None
        pair = self._pair(cmd.stream_name, cmd.instance_name)
        if pair is None:
            self.counters.ignored_streams += 1
            return None
        if not pair.fetchable:
            self.counters.unnamed_writer_commands += 1
            if not pair.heard:
                out.append(UnnamedWriter(pair.stream, pair.writer))
        pair.heard = True
        return pair

    def receive_rdata(self, cmd: RdataCommand) -> list[Event]:
        """:meth:`receive` for an RDATA, without the dispatch (the hot path)."""
        out: list[Event] = []
        pair = self._pair_of(cmd, out)
        if pair is None:
            return out
        token = cmd.token
        if pair.fetch is None and not pair.connected:
            if token is not None:
                self._drop_batch(pair)
                if self.connect_on_rdata:
                    self._connect_at(pair, token, out)
                    return out
            self.counters.unconnected_dropped += 1
            return out
        if token is None:
            if pair.batch_lost:
                pass
            elif len(pair.batch) < self.max_buffered:
                pair.batch.append(cmd.row)
            else:
                self.counters.batch_overflows += 1
                pair.batch.clear()
                pair.batch_lost = True
            return out
        entry: _Entry
        if pair.batch_lost:
            pair.batch_lost = False
            entry = _Missed(token)
        elif pair.batch:
            pair.batch.append(cmd.row)
            entry = _Rows(token, tuple(pair.batch))
            pair.batch.clear()
        elif pair.fetch is None:
            # The common case, live and alone: applied without an entry.
            self._apply_rows(pair, token, (cmd.row,), out)
            return out
        else:
            entry = _Rows(token, (cmd.row,))
        if pair.fetch is not None:
            self._enqueue(pair, entry)
        else:
            self._apply(pair, entry, out)
        return out

    def _connect_at(self, pair: _Pair, token: int, out: list[Event]) -> None:
        """Rule 2b: connect an unconnected pair at its RDATA's token, by fetching
        everything up to it (the batch may have begun before we listened)."""
        cur = pair.token
        if cur is not None and token <= cur:
            self.counters.duplicates_dropped += 1
            return
        self.counters.rdata_connects += 1
        if not pair.fetchable:
            self.counters.unnamed_writer_gaps += 1
            pair.connected = True
            self._advance(pair, token, out)
            return
        if cur is None:
            self._advance(pair, token - 1, out)  # "from now": just before this token
        self._start_fetch(pair, token, True, out)

    def _receive_position(self, cmd: PositionCommand) -> list[Event]:
        out: list[Event] = []
        pair = self._pair_of(cmd, out)
        if pair is None:
            return out
        if cmd.prev_token > cmd.new_token:
            self.counters.malformed_positions += 1
            return out
        if pair.fetch is not None:
            self._drop_batch(pair)
            self._enqueue(pair, cmd)
            return out
        if self._redundant(pair, cmd):
            return out
        self._drop_batch(pair)
        self._position(pair, cmd, out)
        return out

    # ------------------------------------------------------------ the rules

    def _apply(self, pair: _Pair, entry: _Entry, out: list[Event]) -> None:
        """Apply one live or replayed entry to a pair that is not fetching."""
        if isinstance(entry, _Rows):
            self._apply_rows(pair, entry.token, entry.rows, out)
        elif isinstance(entry, _Missed):
            if pair.token is not None and entry.token > pair.token:
                self._start_fetch(pair, entry.token, pair.connected, out)
        elif not self._redundant(pair, entry):
            self._position(pair, entry, out)

    def _apply_rows(
        self, pair: _Pair, token: int, rows: tuple[AnyRow, ...], out: list[Event]
    ) -> None:
        if not pair.connected:
            self.counters.unconnected_dropped += len(rows)
        elif pair.token is not None and token <= pair.token:
            self.counters.duplicates_dropped += 1
        else:
            self._deliver(pair, token, rows, False, out)

    def _redundant(self, pair: _Pair, cmd: PositionCommand) -> bool:
        if pair.connected and pair.token is not None and cmd.new_token == pair.token:
            self.counters.redundant_positions += 1
            return True
        return False

    def _position(self, pair: _Pair, cmd: PositionCommand, out: list[Event]) -> None:
        cur = pair.token
        new = cmd.new_token
        if cur is None or cmd.prev_token <= cur <= new:
            pair.connected = True
            self._advance(pair, new, out)
        elif cur < cmd.prev_token:
            if pair.fetchable:
                self._start_fetch(pair, new, True, out)
            else:
                self.counters.unnamed_writer_gaps += 1
                pair.connected = True
                self._advance(pair, new, out)
        else:
            pair.connected = True
            if pair.resettable:
                self.counters.resets += 1
                pair.token = new
                out.append(StreamReset(pair.stream, pair.writer, cur, new))
            else:
                self.counters.writers_behind += 1
                if self.trust_writer:
                    pair.token = new
                out.append(WriterBehind(pair.stream, pair.writer, cur, new, self.trust_writer))

    def _enqueue(self, pair: _Pair, entry: _Entry) -> None:
        fetch = pair.fetch
        assert fetch is not None and pair.token is not None
        if not fetch.in_flight and not fetch.queue and not pair.resettable:
            # Waiting for room (rule 6): remember how far to fetch, keep nothing.
            if isinstance(entry, PositionCommand):
                if entry.new_token >= pair.token:
                    fetch.target = max(fetch.target, entry.new_token)
                    fetch.connect = True
                    return
            else:
                fetch.target = max(fetch.target, entry.token)
                return
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
        if not pair.fetchable:
            # Rows we dropped ourselves (a batch too long to keep) from a
            # writer nothing can be fetched from: a real loss, said so.
            assert pair.token is not None
            self.counters.gaps_unfillable += 1
            out.append(
                GapUnfillable(
                    pair.stream,
                    pair.writer,
                    pair.token,
                    upto,
                    f"{pair.writer!r} is not named in the configuration, so its rows "
                    "cannot be fetched",
                )
            )
            pair.connected = connect
            self._advance(pair, upto, out)
            return
        pair.fetch = _Fetch(upto, connect)
        pair.connected = False
        self._request(pair, out)

    def _request(self, pair: _Pair, out: list[Event]) -> None:
        """Ask for the next page now, or wait for the budget to want one."""
        fetch = pair.fetch
        assert fetch is not None and pair.token is not None
        if not self._budget.wants_pages(pair.stream):
            self._waiting.setdefault(pair.stream, {})[pair.writer] = pair
            return
        self._unwait(pair)
        fetch.in_flight = True
        self.counters.fetches += 1
        out.append(FetchNeeded(pair.stream, pair.writer, pair.token, fetch.target))

    def _hold(self, pair: _Pair, token: int) -> None:
        """The budget refused live rows at ``token``: fetch them once there is room."""
        self.counters.overflows += 1
        pair.fetch = _Fetch(token, pair.connected)
        pair.connected = False
        self._waiting.setdefault(pair.stream, {})[pair.writer] = pair

    def _unwait(self, pair: _Pair) -> None:
        waiting = self._waiting.get(pair.stream)
        if waiting is not None and waiting.pop(pair.writer, None) is not None and not waiting:
            del self._waiting[pair.stream]

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
                # A replayed entry started another fetch (or was refused): the
                # rest waits for it.
                while queue:
                    self._enqueue(pair, queue.popleft())
                return

    def _requesting(self, stream: str, writer: str, what: str) -> _Pair:
        pair = self._pairs.get(stream, {}).get(writer)
        if pair is None or pair.fetch is None or not pair.fetch.in_flight:
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
        if not self._budget.reserve(pair.stream, len(rows), not fetched and pair.fetchable):
            self._hold(pair, token)
            return
        pair.token = token
        out.append(_rows_received(pair.stream, pair.writer, token, rows, fetched))

    def _advance(self, pair: _Pair, token: int, out: list[Event]) -> None:
        if pair.token is None or token > pair.token:
            pair.token = token
            out.append(PositionAdvanced(pair.stream, pair.writer, token))


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
