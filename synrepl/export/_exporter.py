"""The exporter: the client's batches in, acknowledged sink sends out.

It is a handler of a :class:`~synrepl.asyncio.client.ReplicationClient` (or
of the Twisted one on the asyncio reactor).  Because the client hands a
stream its next batch only after the handler returned and the checkpoint
was saved, returning only once the sink acknowledged gives the guarantee:
nothing is checkpointed that the sink does not have.

A sink that is down (:class:`SinkUnavailable`) is retried for ever with
backoff: the stream stops advancing, and the client keeps at most its
``max_pending_rows`` per stream in memory, fetching the rest from the writers
over HTTP once the sink is back.  A sink that refused a batch
(:class:`SinkRejected`, or any other error) fails the handler, and the
client's failure policy retries it, then dead-letters it or stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from synrepl._ratelimit import MonotonicClock, RateLimitedWarning
from synrepl.connection import ReconnectBackoff
from synrepl.events import EventFilter, EventSource, EventsReceived
from synrepl.export._messages import ExportMessage, messages_of_events, messages_of_rows
from synrepl.export._partition import Partition
from synrepl.export._sink import Sink, SinkUnavailable
from synrepl.positions import RowsReceived
from synrepl.streams import EventRow

__all__ = ("Exporter", "ExportStats", "ExportStopped", "ExportingClient")

logger = logging.getLogger(__name__)


class ExportStopped(SinkUnavailable):
    """The exporter was closed while a batch waited for the sink: that batch
    is not acknowledged, so it is exported again after a restart."""


class ExportingClient(Protocol):
    """What the exporter needs of a client (either adapter's)."""

    def on_rows(self, stream: str | None, handler: Callable[[RowsReceived], object]) -> None: ...

    def on_events(
        self,
        handler: Callable[[EventsReceived], object],
        *,
        source: EventSource,
        filter: EventFilter | None = None,
    ) -> None: ...


@attrs.define
class ExportStats:
    """The exporter's running totals and state (for logs and metrics).

    Attributes:
        messages: messages the sink acknowledged.
        batches: sends the sink acknowledged.
        skipped: messages left to other partitions (or handed over).
        sink_failures: sends or connections that failed with the sink down.
        sink_up: the last send or connection attempt succeeded.
        waiting_since: since when (monotonic seconds) the current batch waits
            for the sink; None when nothing waits.
        acknowledged: per stream and writer, the last token the sink
            acknowledged (or that had nothing to export).
    """

    messages: int = 0
    batches: int = 0
    skipped: int = 0
    sink_failures: int = 0
    sink_up: bool = False
    waiting_since: float | None = None
    acknowledged: dict[str, dict[str, int]] = attrs.field(factory=dict)


class Exporter:
    """Sends each followed batch to ``sink`` and returns once it acknowledged.

    Args:
        sink: where the messages go.
        server_name: the homeserver's name (the first part of every id).
        partition: export only this partition's share (None: everything).
        key_field: the message (or row) field partitions split on.
        backoff: the waits between attempts while the sink is down (default:
            from 0.5 s, doubling to 30 s, with jitter).
        clock: monotonic seconds, for :attr:`ExportStats.waiting_since`.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        server_name: str,
        partition: Partition | None = None,
        key_field: str = "room_id",
        backoff: ReconnectBackoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.server_name = server_name
        self.partition = partition
        self.key_field = key_field
        self.stats = ExportStats()
        self._backoff = backoff or ReconnectBackoff(min_delay=0.5, max_delay=30.0)
        self._clock = clock
        self._open = False
        self._closing = asyncio.Event()
        self._one_send = asyncio.Lock()
        self._down = RateLimitedWarning(logger, MonotonicClock(), period=30.0)

    # ------------------------------------------------------------ wiring

    def follow_rows(
        self, client: ExportingClient, stream: str | None, *, filter: EventFilter | None = None
    ) -> None:
        """Export the typed rows of ``stream`` (None: every followed stream).

        ``filter`` keeps, of the events stream's rows, those whose row alone
        passes it (room, type, membership); other streams' rows all go.
        """

        def handle(batch: RowsReceived) -> asyncio.Future[None]:
            return asyncio.ensure_future(self.export_rows(batch, filter=filter))

        client.on_rows(stream, handle)

    def follow_events(
        self, client: ExportingClient, *, source: EventSource, filter: EventFilter | None = None
    ) -> None:
        """Export the events stream's full events, read from ``source``.

        Each batch runs as an asyncio task (the sinks' libraries need one),
        which either client adapter awaits.
        """

        def handle(batch: EventsReceived) -> asyncio.Future[None]:
            return asyncio.ensure_future(self.export_events(batch))

        client.on_events(handle, source=source, filter=filter)

    # ------------------------------------------------------------ handlers

    async def export_rows(self, batch: RowsReceived, *, filter: EventFilter | None = None) -> None:
        """Export one token's rows; returns once the sink acknowledged them."""
        keep = None
        if filter is not None and batch.stream == "events":
            keep = [
                n
                for n, row in enumerate(batch.rows)
                if not isinstance(row, EventRow) or filter.row_decides(row) is not False
            ]
        messages = messages_of_rows(self.server_name, batch, key_field=self.key_field, keep=keep)
        await self.export(batch.stream, batch.writer, batch.token, messages)

    async def export_events(self, batch: EventsReceived) -> None:
        """Export one token's full events; returns once the sink acknowledged them."""
        messages = messages_of_events(self.server_name, batch, key_field=self.key_field)
        await self.export(batch.stream, batch.writer, batch.token, messages)

    async def export(
        self, stream: str, writer: str, token: int, messages: Sequence[ExportMessage]
    ) -> None:
        """Send ``messages`` (this partition's share), retrying while the sink
        is down; returns once it acknowledged them.

        Raises:
            ExportStopped: :meth:`close` was called while the sink was down.
            SinkRejected: the sink refused the messages (so does anything
                else the sink raised, as is).
        """
        if self.partition is not None:
            kept = self.partition.select(messages)
            self.stats.skipped += len(messages) - len(kept)
            messages = kept
        if messages:
            await self._send(messages)
        self.stats.acknowledged.setdefault(stream, {})[writer] = token

    async def _send(self, messages: Sequence[ExportMessage]) -> None:
        # Streams do not wait for each other, but the sink contract promises
        # one send at a time: the streams take turns.
        async with self._one_send:
            await self._send_alone(messages)

    async def _send_alone(self, messages: Sequence[ExportMessage]) -> None:
        logger.debug("sending %d messages from %s", len(messages), messages[0].id)
        failures = 0
        while True:
            if self._closing.is_set():
                raise ExportStopped(f"stopped while {self.sink.target} was down")
            try:
                if not self._open:
                    await self.sink.open()
                    self._open = True
                await self.sink.send(messages)
            except SinkUnavailable as e:
                self._open = False
                failures += 1
                self.stats.sink_failures += 1
                self.stats.sink_up = False
                if self.stats.waiting_since is None:
                    self.stats.waiting_since = self._clock()
                delay = self._backoff.delay(failures - 1)
                self._down.warning(
                    "sink %s unavailable (%s); %s from %s at %d waits, next try in %.1f s",
                    self.sink.target,
                    str(e).removeprefix(f"{self.sink.target}: "),
                    messages[0].stream,
                    messages[0].writer,
                    messages[0].token,
                    delay,
                )
                await self._wait(delay)
                continue
            break
        if failures:
            logger.warning("sink %s is back after %d failed attempts", self.sink.target, failures)
        self.stats.sink_up = True
        self.stats.waiting_since = None
        self.stats.messages += len(messages)
        self.stats.batches += 1

    async def open(self) -> None:
        """Connect the sink now rather than at the first batch, so that a sink
        down at start shows at once (logged, in :attr:`stats`).

        Raises:
            SinkUnavailable: the sink is not there (batches wait for it).
        """
        async with self._one_send:
            try:
                await self.sink.open()
            except SinkUnavailable:
                self.stats.sink_up = False
                self.stats.sink_failures += 1
                raise
            self._open = True
            self.stats.sink_up = True

    async def _wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            pass

    async def close(self) -> None:
        """Stop retrying (a batch waiting for a sink that is down fails with
        :class:`ExportStopped`), let a send under way finish, then close the
        sink.  Stop the client at the same time: it then hands out no new
        batch, and saves the checkpoint of the one that finished."""
        self._closing.set()
        async with self._one_send:
            if self._open:
                self._open = False
                await self.sink.close()

    def behind(self) -> float:
        """How long (seconds) the current batch has waited for the sink; 0 when none waits."""
        since = self.stats.waiting_since
        return 0.0 if since is None else max(0.0, self._clock() - since)
