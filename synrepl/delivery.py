"""Delivery: from rows that are known to rows that are handled, in order, in bounded memory.

Rule 1: everything that decides when rows reach the handlers, how much may
wait for them, and what counts as processed lives in this module.  The
adapters (Twisted, asyncio) call the handlers and report back; they keep no
queue, bound, position or waiter of their own.

Theory of operation
===================

:class:`Delivery` is a pure, synchronous state machine on top of
:class:`~synrepl.positions.StreamPositions` (which it owns as ``wire``).
Inputs are what the adapters learn: a command from the wire
(:meth:`~Delivery.receive`), a fetched page or a failed fetch, a lost
connection, and a handled batch (:meth:`~Delivery.handled`).  Each returns
a list of *actions*, in order:

- :class:`~synrepl.positions.RowsReceived`: run the handlers on this batch,
  then call :meth:`~Delivery.handled` with it.  At most one batch per
  stream is out at a time; streams do not wait for each other.
- :class:`~synrepl.positions.FetchNeeded`: fetch that range over HTTP and
  report the page (:meth:`~Delivery.fetched`) or the failure.
- :class:`~synrepl.positions.GapUnfillable`, :class:`~synrepl.positions.StreamReset`,
  :class:`~synrepl.positions.WriterBehind`: tell the user, loudly.  They
  come out when the handlers reach them, in order with the rows.
- :class:`~synrepl.positions.UnnamedWriter`: warn that a writer is not in
  the configuration.
- :class:`PositionReached`: a waiter's position has been processed.
- :class:`Ready`: every expected writer of every followed stream has a
  processed position (once).
- :class:`SaveCheckpoint`: save these positions, then call
  :meth:`~Delivery.checkpoint_saved` (only with ``acknowledge``).
- :class:`RetryBatch`, :class:`DeadLetterBatch`, :class:`StopDelivery`: the
  handlers failed on a batch; what the failure policy says to do.

The rules:

1. Each stream has one queue of what the wire side handed on (rows,
   position moves, gaps, resets), in order.  The head batch goes out as a
   RowsReceived action; the rest waits until it is handled.  Items without
   rows are processed as soon as they reach the head.
2. *Processed* positions (:meth:`~Delivery.positions`) move when an item
   is processed: a batch once handled, a position move or a gap when
   reached.  A reset, or a writer behind us that is trusted, moves it back.
   That map is the checkpoint: everything at or below it was handled.
3. The memory bound: a stream's queue holds at most ``max_pending_rows``
   rows (a batch bigger than the bound still goes through an empty queue).
   Live rows beyond that are refused, and the wire side remembers the range
   instead (its rule 6).  Once the queue is down to half the bound, the
   refused ranges are fetched from their writers a page at a time, and the
   next page is asked for each time the queue is down to half again, so the
   handler still has rows to work on while a page is on its way.  Fetched
   pages are always taken: at most the bound plus one page per writer is
   held.  Writers that nothing can be fetched from are never refused.
4. Waiters (:meth:`~Delivery.wait_for`) are satisfied by processed
   positions, never by rows merely received: read-after-write means the
   handlers have seen the write.
5. Acknowledge after handling (``acknowledge``): a handled batch is
   processed, but its stream hands out nothing more until a checkpoint that
   includes it is saved.  Saves never overlap: one is asked for whenever the
   processed positions changed and none is in flight, and when it is done
   every stream it covered goes on.  So a crash repeats at most the last
   batch of each stream (at-least-once), and a clean stop repeats nothing.
6. Handler failures (``failure_policy``): the batch is retried after a
   growing delay; after the last retry it is either dead-lettered
   (:meth:`~Delivery.dead_lettered` then processes it) or delivery of its
   stream stops for good (:class:`StopDelivery`).  Positions never move
   past a batch that was neither handled nor dead-lettered.
7. Readiness (:attr:`~Delivery.ready`): every expected writer (``writers``)
   of every followed stream has a processed position, from a start map, a
   seed (:meth:`~Delivery.seed`) or the wire; :meth:`~Delivery.silent_writers`
   names the others.

Nothing here recurses per batch: one call moves each stream forward by at
most one handed-out batch, however long its queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Literal

import attrs

from synrepl.commands import Command, RdataCommand
from synrepl.positions import (
    Event,
    FetchNeeded,
    GapUnfillable,
    PositionAdvanced,
    RowsReceived,
    StateError,
    StreamPositions,
    StreamReset,
    UnnamedWriter,
    WriterBehind,
    lowest_token,
)
from synrepl.streams import AnyRow

__all__ = (
    "Delivery",
    "HandlerFailurePolicy",
    "Action",
    "PositionReached",
    "Ready",
    "SaveCheckpoint",
    "RetryBatch",
    "DeadLetterBatch",
    "StopDelivery",
)


@attrs.frozen
class PositionReached(Event):
    """The waiter registered under ``key`` is satisfied: processed up to ``token``.

    ``token`` is where the pair's processed position now is, which may be
    past the awaited token.
    """

    key: Hashable
    stream: str
    writer: str
    token: int


@attrs.frozen
class Ready(Event):
    """Every expected writer of every followed stream has a processed position."""

    positions: Mapping[str, Mapping[str, int]]


@attrs.frozen
class SaveCheckpoint(Event):
    """Action: save ``positions`` durably, then call :meth:`Delivery.checkpoint_saved`
    (or :meth:`Delivery.checkpoint_failed`)."""

    positions: Mapping[str, Mapping[str, int]]


@attrs.frozen
class RetryBatch(Event):
    """Action: after ``delay`` seconds call :meth:`Delivery.retry`; the handlers
    failed on ``batch`` ``failures`` times, last with ``error``."""

    batch: RowsReceived
    delay: float
    failures: int
    error: str


@attrs.frozen
class DeadLetterBatch(Event):
    """Action: record ``batch`` in the dead-letter store, then call
    :meth:`Delivery.dead_lettered`: the handlers gave up on it."""

    batch: RowsReceived
    failures: int
    error: str


@attrs.frozen
class StopDelivery(Event):
    """The handlers gave up on ``batch`` and nothing may take it: stop, loudly.

    Its stream hands out nothing more and its position stays before it.
    """

    batch: RowsReceived
    failures: int
    error: str


@attrs.frozen
class HandlerFailurePolicy:
    """What to do when the handlers fail on a batch (rule 6).

    Attributes:
        retries: how many times to run the handlers again.
        base_delay: the wait before the first retry, in seconds; each next
            one doubles.
        max_delay: the longest wait.
        then: after the last retry, ``"dead_letter"`` the batch and go on,
            or ``"stop"``.
    """

    retries: int = attrs.field(default=5, validator=attrs.validators.ge(0))
    base_delay: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    max_delay: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    then: Literal["stop", "dead_letter"] = attrs.field(
        default="stop", validator=attrs.validators.in_(("stop", "dead_letter"))
    )

    def delay(self, failures: int) -> float | None:
        """The wait after the ``failures``-th failure, or None: no more retries."""
        if failures > self.retries:
            return None
        return min(self.base_delay * 2.0 ** min(failures - 1, 64), self.max_delay)


#: What :class:`Delivery` asks its adapter to do or to tell.
Action = (
    RowsReceived
    | FetchNeeded
    | GapUnfillable
    | StreamReset
    | WriterBehind
    | UnnamedWriter
    | PositionReached
    | Ready
    | SaveCheckpoint
    | RetryBatch
    | DeadLetterBatch
    | StopDelivery
)

#: What waits in a stream's queue.
_Item = RowsReceived | PositionAdvanced | GapUnfillable | StreamReset | WriterBehind


@attrs.define
class _Queue:
    items: deque[_Item] = attrs.Factory(deque)
    #: Rows waiting in ``items`` (the batch out with the handlers excluded).
    pending: int = 0
    #: The batch out with the handlers, until it is handled or dead-lettered.
    running: RowsReceived | None = None
    #: How often the handlers failed on ``running``.
    failures: int = 0
    #: A RetryBatch for ``running`` is out.
    retry_due: bool = False
    #: Handled, waiting for a checkpoint that includes it (rule 5).
    unsaved: bool = False
    #: StopDelivery was emitted: nothing more goes out.
    stopped: bool = False


class Delivery:
    """Queues toward the handlers, the memory bound, processed positions,
    waiters, acknowledgement, failures and readiness.

    Args:
        local_instance: our own instance name (its commands are echoes).
        streams: the streams followed; None: all.
        start: processed positions to resume from, as :meth:`positions`
            returns them.
        writers: the expected writers of streams, for :meth:`persisted_upto`
            and readiness (rule 7).
        fetchable: the writers rows can be fetched from; None: all.
        resettable_streams: see :class:`~synrepl.positions.StreamPositions`.
        trust_writer: on a writer behind us, take its position (True) or
            keep ours (False).
        connect_on_rdata: connect pairs at their first RDATA too (for
            clients that send no REPLICATE); see the wire side's rule 2b.
        max_pending_rows: the per-stream bound of rule 3.
        acknowledge: a handled batch waits for a saved checkpoint (rule 5).
        failure_policy: rule 6.

    Raises:
        ValueError: ``max_pending_rows`` is below 1.
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
        max_pending_rows: int = 10_000,
        acknowledge: bool = False,
        failure_policy: HandlerFailurePolicy | None = None,
    ) -> None:
        if max_pending_rows < 1:
            raise ValueError(f"max_pending_rows must be at least 1, not {max_pending_rows}")
        self.max_pending_rows = max_pending_rows
        self._refill_at = max_pending_rows // 2
        self._local = local_instance
        self._tracked = None if streams is None else frozenset(streams)
        self._writers = {
            stream: tuple(names)
            for stream, names in (writers or {}).items()
            if self._tracked is None or stream in self._tracked
        }
        self._acknowledge = acknowledge
        self._policy = failure_policy if failure_policy is not None else HandlerFailurePolicy()
        #: The wire side: positions of rows handed on, batches, gaps, fetches.
        self.wire = StreamPositions(
            local_instance=local_instance,
            streams=streams,
            start=start,
            writers=writers,
            fetchable=fetchable,
            resettable_streams=resettable_streams,
            trust_writer=trust_writer,
            connect_on_rdata=connect_on_rdata,
            max_buffered=max_pending_rows,
            budget=self,
        )
        self._queues: dict[str, _Queue] = {}
        self._wire_waiting = self.wire.waiting_streams
        self._processed: dict[str, dict[str, int]] = {}
        self._waiters: dict[Hashable, tuple[str, str, int]] = {}
        self._waiters_by_pair: dict[tuple[str, str], dict[Hashable, int]] = {}
        self._silent = {
            (stream, writer)
            for stream, names in self._writers.items()
            for writer in names
            if writer != local_instance
        }
        self._ready_told = False
        #: Processed positions changed since the last save began.
        self._dirty = False
        #: The streams the save in flight covers (None: no save in flight).
        self._saving: set[str] | None = None
        for stream, tokens in (start or {}).items():
            if self._tracked is None or stream in self._tracked:
                for writer, token in tokens.items():
                    self._processed_to(stream, writer, token, False, [])
        self._dirty = False

    # ------------------------------------------------------------ queries

    def positions(self) -> dict[str, dict[str, int]]:
        """Processed positions, ``{stream: {writer: token}}``: the checkpoint."""
        return {stream: dict(tokens) for stream, tokens in self._processed.items() if tokens}

    def processed(self, stream: str, writer: str) -> int | None:
        """How far the handlers have processed ``writer``'s rows of ``stream``."""
        return self._processed.get(stream, {}).get(writer)

    def persisted_upto(self, stream: str) -> int | None:
        """The lowest processed token over the stream's writers.

        The writers are the expected ones for the stream and every writer
        processed on it, our own instance left out; None until each of them
        has a processed position.
        """
        tokens = self._processed.get(stream, {})
        expected = (*self._writers.get(stream, ()), *tokens)
        return lowest_token(tokens, expected, self._local)

    @property
    def ready(self) -> bool:
        """Whether every expected writer of every followed stream has a
        processed position (rule 7)."""
        return not self._silent

    def silent_writers(self) -> dict[str, list[str]]:
        """The expected writers without a processed position yet, by stream."""
        out: dict[str, list[str]] = {}
        for stream, writer in sorted(self._silent):
            out.setdefault(stream, []).append(writer)
        return out

    @property
    def idle(self) -> bool:
        """No batch is with the handlers (a retry that is only due does not
        count) and no checkpoint save is in flight: a stop may end now."""
        if self._saving is not None:
            return False
        return not any(
            q.running is not None and not q.retry_due and not q.stopped
            for q in self._queues.values()
        )

    @property
    def unsaved(self) -> bool:
        """Processed positions changed since the last checkpoint save began."""
        return self._dirty

    def pending_rows(self, stream: str) -> int:
        """Rows of ``stream`` waiting for the handlers (the batch out excluded)."""
        queue = self._queues.get(stream)
        return 0 if queue is None else queue.pending

    def running(self, stream: str) -> RowsReceived | None:
        """The batch of ``stream`` out with the handlers, if any."""
        queue = self._queues.get(stream)
        return None if queue is None else queue.running

    # ------------------------------------------------------------ the budget (rule 3)

    def reserve(self, stream: str, rows: int, refusable: bool) -> bool:
        """Room for ``rows`` rows in ``stream``'s queue; see :class:`~synrepl.positions.Budget`."""
        queue = self._queue(stream)
        if refusable and queue.pending and queue.pending + rows > self.max_pending_rows:
            return False
        queue.pending += rows
        return True

    def wants_pages(self, stream: str) -> bool:
        """Whether ``stream``'s queue is down to half the bound."""
        queue = self._queues.get(stream)
        return queue is None or queue.pending <= self._refill_at

    # ------------------------------------------------------------ waiters (rule 4)

    def wait_for(self, stream: str, writer: str, token: int, key: Hashable) -> bool:
        """Ask to be told when ``writer``'s ``stream`` is processed up to ``token``.

        Returns:
            True when it already is (nothing is registered); else False, and
            a :class:`PositionReached` with ``key`` comes out later.  Our own
            instance's positions count as reached at once.

        Raises:
            StateError: the stream is not followed, or ``key`` is already
                waiting.
        """
        if writer == self._local:
            return True
        if self._tracked is not None and stream not in self._tracked:
            raise StateError(f"stream {stream!r} is not followed, so it never moves")
        current = self.processed(stream, writer)
        if current is not None and current >= token:
            return True
        if key in self._waiters:
            raise StateError(f"a waiter with key {key!r} is already registered")
        self._waiters[key] = (stream, writer, token)
        self._waiters_by_pair.setdefault((stream, writer), {})[key] = token
        return False

    def cancel_wait(self, key: Hashable) -> bool:
        """Forget the waiter ``key`` (say, on timeout).  False if there was none."""
        found = self._waiters.pop(key, None)
        if found is None:
            return False
        stream, writer, _ = found
        by_pair = self._waiters_by_pair[(stream, writer)]
        del by_pair[key]
        if not by_pair:
            del self._waiters_by_pair[(stream, writer)]
        return True

    def waiter_keys(self) -> list[Hashable]:
        """The keys of every registered waiter."""
        return list(self._waiters)

    # ------------------------------------------------------------ inputs from the wire

    def receive(self, cmd: Command) -> list[Action]:
        """One command from the wire (only RDATA and POSITION matter)."""
        if type(cmd) is RdataCommand:
            return self._route(self.wire.receive_rdata(cmd))
        return self._route(self.wire.receive(cmd))

    def fetched(
        self,
        stream: str,
        writer: str,
        updates: Sequence[tuple[int, AnyRow]],
        upto_token: int,
        limited: bool,
    ) -> list[Action]:
        """One page answering a FetchNeeded; see :meth:`StreamPositions.fetched`."""
        return self._route(self.wire.fetched(stream, writer, updates, upto_token, limited))

    def fetch_failed(self, stream: str, writer: str, reason: str) -> list[Action]:
        """A FetchNeeded that cannot be done; the missing range becomes a gap."""
        return self._route(self.wire.fetch_failed(stream, writer, reason))

    def connection_lost(self) -> list[Action]:
        """The Redis connection went away (see :meth:`StreamPositions.connection_lost`)."""
        return self._route(self.wire.connection_lost())

    def seed(self, positions: Mapping[str, Mapping[str, int]]) -> list[Action]:
        """Positions the writers are known to have reached (Synapse's database,
        or a checkpoint loaded after construction): writers we know nothing
        of start there, writers we are behind are fetched up to them; see
        :meth:`StreamPositions.seed`."""
        return self._route(self.wire.seed(positions))

    # ------------------------------------------------------------ inputs from the handlers

    def handled(self, batch: RowsReceived) -> list[Action]:
        """The handlers are done with ``batch``, the one out for its stream.

        Raises:
            StateError: ``batch`` is not the batch out for its stream.
        """
        return self._processed_batch(self._running_queue(batch, "handled"), batch)

    def handler_failed(self, batch: RowsReceived, error: str) -> list[Action]:
        """The handlers failed on ``batch`` (rule 6): a RetryBatch, a
        DeadLetterBatch or a StopDelivery comes out.

        Raises:
            StateError: ``batch`` is not the batch out for its stream.
        """
        queue = self._running_queue(batch, "handler_failed")
        queue.failures += 1
        delay = self._policy.delay(queue.failures)
        if delay is not None:
            queue.retry_due = True
            return [RetryBatch(batch, delay, queue.failures, error)]
        if self._policy.then == "dead_letter":
            return [DeadLetterBatch(batch, queue.failures, error)]
        queue.stopped = True
        return [StopDelivery(batch, queue.failures, error)]

    def retry(self, batch: RowsReceived) -> list[Action]:
        """The delay of a RetryBatch is over: ``batch`` goes out again.

        Raises:
            StateError: no retry of ``batch`` is due.
        """
        queue = self._running_queue(batch, "retry")
        if not queue.retry_due:
            raise StateError(f"retry() for {batch.stream} at {batch.token}, which is not due")
        queue.retry_due = False
        return [batch]

    def abandoned(self, batch: RowsReceived) -> list[Action]:
        """A stop gave up on ``batch`` unfinished: it is not processed (a
        restart delivers it again) and its stream hands out nothing more."""
        queue = self._running_queue(batch, "abandoned")
        queue.running = None
        queue.stopped = True
        return []

    def dead_lettered(self, batch: RowsReceived) -> list[Action]:
        """``batch`` is safely in the dead-letter store: it counts as processed."""
        return self._processed_batch(self._running_queue(batch, "dead_lettered"), batch)

    # ------------------------------------------------------------ inputs from the checkpoint store

    def checkpoint_saved(self) -> list[Action]:
        """The positions of the last SaveCheckpoint are durable (rule 5)."""
        covered, self._saving = self._saving or set(), None
        out: list[Action] = []
        for stream in covered:
            queue = self._queues[stream]
            queue.unsaved = False
            self._pump(stream, queue, out)
        self._maybe_save(out)
        return out

    def checkpoint_failed(self) -> list[Action]:
        """The last SaveCheckpoint did not happen; nothing goes on until
        :meth:`save_again` (the adapter waits a while first)."""
        if self._saving is not None:
            self._saving = None
            self._dirty = True
        return []

    def save_again(self) -> list[Action]:
        """Ask for a save after a failed one."""
        out: list[Action] = []
        self._maybe_save(out)
        return out

    # ------------------------------------------------------------ internals

    def _queue(self, stream: str) -> _Queue:
        queue = self._queues.get(stream)
        if queue is None:
            queue = self._queues[stream] = _Queue()
        return queue

    def _running_queue(self, batch: RowsReceived, what: str) -> _Queue:
        queue = self._queues.get(batch.stream)
        if queue is None or queue.running is not batch:
            raise StateError(
                f"{what}() for {batch.stream}/{batch.writer} at {batch.token}, "
                "which is not the batch out with the handlers"
            )
        return queue

    def _processed_batch(self, queue: _Queue, batch: RowsReceived) -> list[Action]:
        queue.running = None
        queue.failures = 0
        queue.retry_due = False
        out: list[Action] = []
        self._processed_to(batch.stream, batch.writer, batch.token, False, out)
        if self._acknowledge:
            queue.unsaved = True
        self._pump(batch.stream, queue, out)
        if self._acknowledge:
            self._maybe_save(out)
        return out

    def _route(self, events: list[Event]) -> list[Action]:
        if not events:
            return []
        out: list[Action] = []
        if len(events) == 1 and type(events[0]) is RowsReceived:
            # The common case (one live batch) without the bookkeeping below.
            batch = events[0]
            batch_queue = self._queue(batch.stream)
            batch_queue.items.append(batch)
            self._pump(batch.stream, batch_queue, out)
            if self._acknowledge:
                self._maybe_save(out)
            return out
        touched: dict[str, _Queue] = {}
        for event in events:
            if isinstance(event, (FetchNeeded, UnnamedWriter)):
                out.append(event)
            else:
                assert isinstance(
                    event,
                    (RowsReceived, PositionAdvanced, GapUnfillable, StreamReset, WriterBehind),
                ), event
                queue = touched.get(event.stream)
                if queue is None:
                    queue = touched[event.stream] = self._queue(event.stream)
                queue.items.append(event)
        for stream, queue in touched.items():
            self._pump(stream, queue, out)
        self._maybe_save(out)
        return out

    def _pump(self, stream: str, queue: _Queue, out: list[Action]) -> None:
        """Rule 1: process items up to the next batch, and hand that out."""
        items = queue.items
        # Blocked while a batch is out, unsaved (rule 5) or delivery stopped.
        while items and queue.running is None and not queue.unsaved and not queue.stopped:
            item = items.popleft()
            if isinstance(item, RowsReceived):
                queue.pending -= len(item.rows)
                queue.running = item
                out.append(item)
            elif isinstance(item, PositionAdvanced):
                self._processed_to(stream, item.writer, item.token, False, out)
            elif isinstance(item, GapUnfillable):
                out.append(item)
                self._processed_to(stream, item.writer, item.upto_token, False, out)
            elif isinstance(item, StreamReset):
                out.append(item)
                self._processed_to(stream, item.writer, item.new_token, True, out)
            else:
                out.append(item)
                if item.trusted:
                    self._processed_to(stream, item.writer, item.new_token, True, out)
        if queue.pending <= self._refill_at and stream in self._wire_waiting:
            out.extend(self.wire.resume(stream))  # type: ignore[arg-type]

    def _processed_to(
        self, stream: str, writer: str, token: int, back: bool, out: list[Action]
    ) -> None:
        tokens = self._processed.get(stream)
        if tokens is None:
            tokens = self._processed[stream] = {}
        current = tokens.get(writer)
        if not back and current is not None and token <= current:
            return
        tokens[writer] = token
        self._dirty = True
        if current is None and self._silent:
            self._silent.discard((stream, writer))
            if not self._silent and not self._ready_told:
                self._ready_told = True
                out.append(Ready(self.positions()))
        waiting = self._waiters_by_pair.get((stream, writer))
        if waiting:
            for key in [key for key, wanted in waiting.items() if wanted <= token]:
                self.cancel_wait(key)
                out.append(PositionReached(key, stream, writer, token))

    def _maybe_save(self, out: list[Action]) -> None:
        """Rule 5: ask for a save when positions changed and none is in flight."""
        if not self._acknowledge or not self._dirty or self._saving is not None:
            return
        self._dirty = False
        self._saving = {stream for stream, queue in self._queues.items() if queue.unsaved}
        out.append(SaveCheckpoint(self.positions()))
