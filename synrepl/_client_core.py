"""The reactor-free half of every ReplicationClient.

An adapter (``synrepl.twisted.client``, later ``synrepl.asyncio``) owns the
sockets and the event loop; this class owns everything else a client does:
it types lines, routes them to :class:`~synrepl.delivery.Delivery` or to
command handlers, calls row handlers (directly when they return nothing,
through the adapter when they return an awaitable), carries the core's
actions out through a few hooks, keeps counters and says what went wrong
in the log.  No protocol or delivery rule is decided in an adapter.

The adapter implements four hooks: :meth:`_start_fetch` (ask a writer for a
page, then call :meth:`_fetch_done` or :meth:`_fetch_failed`),
:meth:`_await_then` (wait for what a handler returned),
:meth:`_waiter_reached` and :meth:`_send`.  It feeds the transport's events
in through :meth:`_line_received`, :meth:`_subscribed` and
:meth:`_connection_lost`.

Actions are carried out by one loop (:meth:`_perform`): a handler that
completes synchronously queues the next batch instead of calling into it,
so thousands of queued batches cost no stack.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Hashable,
    Mapping,
    Sequence,
)
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import attrs

from synrepl._ratelimit import RateLimitedWarning, SecondsClock
from synrepl.commands import (
    COMMAND_TYPES,
    CancelTaskCommand,
    ClearUserSyncCommand,
    Command,
    FederationAckCommand,
    LockReleasedCommand,
    NewActiveTaskCommand,
    PositionCommand,
    RdataCommand,
    RemoteServerUpCommand,
    ReplicateCommand,
    SelectiveParser,
    UserIpCommand,
    UserSyncCommand,
    encode,
    parse_line,
    sender_of,
)
from synrepl.config import SynapseConfig
from synrepl.connection import AttemptFailure, TransportOptions
from synrepl.deadletters import DeadLetter
from synrepl.delivery import (
    Action,
    DeadLetterBatch,
    Delivery,
    HandlerFailurePolicy,
    PositionReached,
    Ready,
    RetryBatch,
    SaveCheckpoint,
    StopDelivery,
)
from synrepl.errors import MalformedRowError, ProtocolError, SynreplError, UnknownCommandError
from synrepl.events import (
    Done,
    EventFetch,
    EventFetchPolicy,
    EventFetchStats,
    EventFilter,
    EventSource,
    EventSourceUnavailable,
    EventsReceived,
    Fetch,
    FullEvent,
    MissingEvent,
)
from synrepl.metrics import (
    ClientMetrics,
    Histogram,
    LatencyRecorder,
    StreamMetrics,
    WriterMetrics,
    merged_keys,
)

if TYPE_CHECKING:
    from synrepl.checkpoints import CheckpointStore
    from synrepl.deadletters import DeadLetterStore
from synrepl.positions import (
    Counters,
    FetchNeeded,
    GapUnfillable,
    RowsReceived,
    StreamReset,
    UnnamedWriter,
    WriterBehind,
)
from synrepl.releases import STREAMS_SINCE, SynapseRelease, facts_for
from synrepl.sharding import MAIN_INSTANCE_NAME, canonical_instance_name
from synrepl.streams import STREAM_NAMES, AnyRow, EventRow, parse_row

__all__ = (
    "ClientCore",
    "ClientCounters",
    "ReadOnlyError",
    "RowHandler",
    "EventsHandler",
    "GapHandler",
    "ResetHandler",
    "StreamUpdatesLike",
    "StreamFetcher",
    "Transport",
    "TransportFactory",
    "named_instances",
)

logger = logging.getLogger("synrepl.client")

_C = TypeVar("_C", bound=Command)
_T = TypeVar("_T")
#: What the adapter's ``send_*`` methods return (a Deferred, an awaitable).
_Sent = TypeVar("_Sent", bound=Awaitable[None])

#: What a row handler gets: one token's rows of one writer.  It returns
#: None when done, or an awaitable (coroutine, Deferred, future) to wait for.
RowHandler = Callable[[RowsReceived], object]
GapHandler = Callable[[GapUnfillable], object]
#: What a full-events handler gets (see :meth:`ClientCore.on_events`).
EventsHandler = Callable[[EventsReceived], object]
ResetHandler = Callable[[StreamReset | WriterBehind], object]

#: Longest exception text put in a log line or a gap's reason.
_REASON_LIMIT = 300


class _Closing(Exception):
    """The client stops: an unfinished batch is abandoned (fetched again later)."""


class ReadOnlyError(SynreplError, RuntimeError):
    """The client was asked to publish while in read-only mode."""


class DeliveryStoppedError(SynreplError, RuntimeError):
    """The handlers gave up on a batch that nothing could take (no dead-letter
    store): the client stopped, its position before that batch."""


def _followed_streams(
    streams: Collection[str] | None, release: SynapseRelease | None
) -> frozenset[str] | None:
    """The streams to follow (None: every one there is)."""
    if release is None:
        return None if streams is None else frozenset(streams)
    facts = facts_for(release)
    if streams is None:
        return facts.streams
    lacking = sorted(set(streams) - facts.streams)
    if lacking:
        since = ", ".join(f"{s} (from {STREAMS_SINCE[s]})" for s in lacking if s in STREAMS_SINCE)
        raise ValueError(
            f"Synapse {release} has no {', '.join(lacking)} stream"
            + (f": {since}" if since else "")
        )
    return frozenset(streams)


class NotReadyError(SynreplError, TimeoutError):
    """Some expected writers stayed silent: ``silent`` names them by stream."""

    def __init__(self, silent: Mapping[str, Sequence[str]], waited: float) -> None:
        self.silent = {stream: list(writers) for stream, writers in silent.items()}
        names = "; ".join(f"{s}: {', '.join(w)}" for s, w in self.silent.items())
        super().__init__(f"no position after {waited:g} s from {names}")


class StreamFetcher(Protocol):
    """What the client needs from an HTTP replication client: one page of a
    writer's stream history, ``from_token < token <= upto_token``."""

    def get_repl_stream_updates(
        self, instance: str, stream: str, from_token: int, upto_token: int
    ) -> Any: ...


class Transport(Protocol):
    """What the client needs from a Redis transport (either adapter's)."""

    @property
    def subscribed(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> Awaitable[None]: ...

    def publish(self, channel: str, message: str) -> Awaitable[int]: ...


class TransportFactory(Protocol):
    """Builds a client's transport for its channels and callbacks: by default
    the adapter's Redis transport; ``synrepl.testing.memory.MemoryRedis.connect``
    for tests without Redis."""

    def __call__(
        self,
        channels: Sequence[str],
        *,
        on_line: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        on_connection_lost: Callable[[], None],
        on_attempt_failed: Callable[[AttemptFailure], None] | None,
        publish_enabled: bool,
        options: TransportOptions,
    ) -> Transport: ...


class PositionSource(Protocol):
    """Where "from now" positions can be read before any writer speaks
    (an event source on Synapse's database)."""

    def positions(self) -> dict[str, dict[str, int]]: ...


class StreamUpdatesLike(Protocol):
    """One page of ``get_repl_stream_updates``."""

    @property
    def updates(self) -> list[tuple[int, Any]]: ...

    @property
    def upto_token(self) -> int: ...

    @property
    def limited(self) -> bool: ...


@attrs.frozen
class ClientCounters:
    """A snapshot of a client's running totals (they only ever grow)."""

    #: Lines received from Redis.
    lines: int
    #: Lines (and fetched rows) that did not parse, skipped.
    bad_lines: int
    #: Lines naming a command synrepl does not know, skipped.
    unknown_commands: int
    #: Rows and batches the handlers finished with.
    rows_delivered: int
    batches_delivered: int
    #: Rows that came over HTTP, and pages fetched.
    rows_fetched: int
    fetch_pages: int
    #: Fetches that failed (each became a reported gap).
    fetch_failures: int
    #: Times a stream's queue was full and live rows were refetched later.
    overflows: int
    #: Gaps reported as lost (GapUnfillable).
    gaps: int
    #: Resettable streams whose writer restarted.
    resets: int
    #: Writers found behind our position on a monotonic stream.
    writers_behind: int
    #: Commands from writers the configuration does not name.
    unnamed_writer_commands: int
    #: Handler calls that raised or failed.
    handler_errors: int
    #: Batches run again after their handlers failed.
    handler_retries: int
    #: Batches recorded in the dead-letter store.
    dead_letters: int
    #: Checkpoints saved, and saves that failed (and were tried again).
    checkpoint_saves: int
    checkpoint_failures: int
    #: Redis subscriptions after the first.
    reconnects: int
    #: Full events: fetched, given up on as missing, and source failures.
    events_fetched: int
    events_missing: int
    event_source_failures: int
    #: The position bookkeeping's own counters.
    wire: Counters


@attrs.define
class _Totals:
    lines: int = 0
    bad_lines: int = 0
    unknown_commands: int = 0
    handler_errors: int = 0
    handler_retries: int = 0
    dead_letters: int = 0
    checkpoint_saves: int = 0
    checkpoint_failures: int = 0
    reconnects: int = 0


@attrs.define
class _StreamTotals:
    """One stream's running totals (the client's are their sums)."""

    rows_delivered: int = 0
    batches_delivered: int = 0
    rows_fetched: int = 0
    fetch_pages: int = 0
    fetch_failures: int = 0
    gaps: int = 0
    dead_letters: int = 0


def named_instances(config: SynapseConfig) -> frozenset[str]:
    """Every instance the configuration names: rows can be fetched from these."""
    names = {MAIN_INSTANCE_NAME, config.instance_name}
    names.update(canonical_instance_name(name) for name in config.instance_map)
    names.update(config.stream_writers.all_writers())
    names.update(config.stream_writers.federation_senders)
    return frozenset(names)


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= _REASON_LIMIT else text[:_REASON_LIMIT] + "..."


#: The lines that always matter (checked first: they are most of the traffic).
_MOVES_POSITIONS = ("RDATA ", "POSITION ")


class ClientCore(Generic[_Sent]):
    """The shared body of the ReplicationClient adapters (see the module docs).

    Args:
        config: the cluster's configuration.
        clock: tells the time, for rate-limited warnings and metrics.
        instance_name: this process's name on the wire (default: the
            config's ``worker_name``, else ``synrepl-<random>``).
        streams: the streams to follow (None: all).
        start: processed positions to resume from.
        read_only: publish nothing at all, not even REPLICATE.
        passive: do not send REPLICATE.
        max_pending_rows: the per-stream memory bound.
        trust_writer: on a writer behind our position, take its position.
        checkpoint: where positions are saved after each handled batch and
            resumed from (exclusive with ``start``).
        dead_letters: where batches the handlers gave up on are kept.
        failure_policy: how often to retry a failing batch, and then what.
        seed_from: where to read "from now" positions before any writer speaks.
        silent_after: seconds after start to name writers still silent.
        release: the Synapse release the cluster runs, when known: the
            streams it lacks are not followed (their writers would stay
            silent for ever, so the client would never be ready), naming one
            is a ValueError, and its HTTP client refuses the endpoints that
            release lacks.  None: the streams and endpoints of
            :data:`synrepl.releases.NEWEST`.
    """

    def __init__(
        self,
        config: SynapseConfig,
        clock: SecondsClock,
        *,
        instance_name: str | None,
        streams: Collection[str] | None,
        start: Mapping[str, Mapping[str, int]] | None,
        read_only: bool,
        passive: bool,
        max_pending_rows: int,
        trust_writer: bool,
        checkpoint: CheckpointStore | None = None,
        dead_letters: DeadLetterStore | None = None,
        failure_policy: HandlerFailurePolicy | None = None,
        seed_from: PositionSource | None = None,
        silent_after: float | None = 30.0,
        release: SynapseRelease | None = None,
    ) -> None:
        if max_pending_rows < 1:
            raise ValueError("max_pending_rows must be at least 1")
        if start is not None and checkpoint is not None:
            raise ValueError("give start or checkpoint, not both: the checkpoint is where to start")
        if failure_policy is None:
            failure_policy = HandlerFailurePolicy(
                then="dead_letter" if dead_letters is not None else "stop"
            )
        elif failure_policy.then == "dead_letter" and dead_letters is None:
            raise ValueError("failure_policy says dead_letter, but no dead_letters store is given")
        self._config = config
        self.instance_name = (
            instance_name or config.worker_name or f"synrepl-{secrets.token_hex(4)}"
        )
        self._read_only = read_only
        self._passive = passive
        #: The release told (None: the newest's streams and endpoints).
        self.release = release
        self._streams = _followed_streams(streams, release)
        self._checkpoint = checkpoint
        self._dead_letters = dead_letters
        self._seed_from = seed_from
        self._silent_after = silent_after
        writers = {
            stream: config.stream_writers.writers_for_stream(stream)
            for stream in (STREAM_NAMES if self._streams is None else self._streams)
        }
        self._delivery = Delivery(
            local_instance=self.instance_name,
            streams=self._streams,
            start=start,
            writers=writers,
            fetchable=named_instances(config),
            trust_writer=trust_writer,
            connect_on_rdata=read_only or passive,
            max_pending_rows=max_pending_rows,
            acknowledge=checkpoint is not None,
            failure_policy=failure_policy,
        )
        # All streams: parse_line itself (a SelectiveParser would only pass lines on).
        self._parse: Callable[[str], Command | None] = (
            parse_line if self._streams is None else SelectiveParser(streams=self._streams)
        )
        self._row_handlers: dict[str | None, list[RowHandler]] = {}
        #: Per stream, its handlers then the general ones (rebuilt on on_rows).
        self._stream_handlers: dict[str, list[RowHandler]] = {}
        #: Names of the commands nobody handles: skipped unparsed (RDATA and
        #: POSITION are never in it, they move positions).
        self._unhandled = frozenset(COMMAND_TYPES) - {"RDATA", "POSITION"}
        self._gap_handlers: list[GapHandler] = []
        self._reset_handlers: list[ResetHandler] = []
        self._command_handlers: dict[type[Command], list[Callable[[Any], object]]] = {}
        self._syncing_users: set[tuple[str, str | None]] = set()
        self._totals = _Totals()
        self._stream_totals: dict[str, _StreamTotals] = {}
        #: When each (stream, writer)'s last row arrived (by ``_now``).
        self._row_seen_at: dict[tuple[str, str], float] = {}
        self._fetch_latency = LatencyRecorder()
        #: Per stream, when its batch out went to the handlers; None: not measured.
        self._handler_started: dict[str, float] | None = None
        self._handler_latency = LatencyRecorder()
        self._connected = False
        #: The clock of the metrics: the adapter's loop's.
        self._now: Callable[[], float] = clock.seconds
        self._subscriptions = 0
        self._todo: deque[Action] = deque()
        self._performing = False
        #: Per stream, the handler to start at when its batch is retried.
        self._resume_at: dict[str, int] = {}
        #: Set by a stop: no more batches go out (they are fetched again after a restart).
        self._closing = False
        #: Why delivery stopped for good, if it did.
        self.stop_reason: str | None = None
        self._save_failures = 0
        #: Set by the adapter: the Redis transport and the HTTP fetcher.
        self.transport: Transport
        self._fetcher: StreamFetcher
        self._subscribed_once: _Sent | None = None
        self._stopped = False
        self._timers: set[Callable[[], None]] = set()
        self._ready_waiters: list[_Sent] = []
        self._finish_waiters: list[_Sent] = []
        #: False until stopped; then None, or the error a loud stop ends with.
        self._outcome: DeliveryStoppedError | bool | None = False
        self._event_stats = EventFetchStats()
        self._source_warnings = RateLimitedWarning(logger, clock)
        self._bad_lines = RateLimitedWarning(logger, clock)
        self._handler_errors = RateLimitedWarning(logger, clock)

    # ------------------------------------------------------------ handlers

    def on_rows(self, stream: str | None, handler: RowHandler) -> None:
        """Call ``handler`` with each token's rows of ``stream`` (None: every stream).

        Per stream, the next batch waits until what the handler returns (a
        coroutine, Deferred or other awaitable) has finished; streams do not
        wait for each other.  A handler that returns None is called directly.
        A handler that raises (or whose awaitable fails) is logged, counted
        and retried by the failure policy, then the batch is dead-lettered or
        the client stops; its position never moves past an unhandled batch.
        """
        self._row_handlers.setdefault(stream, []).append(handler)
        self._stream_handlers.clear()

    def on_events(
        self,
        handler: EventsHandler,
        *,
        source: EventSource,
        filter: EventFilter | None = None,
        policy: EventFetchPolicy | None = None,
    ) -> None:
        """Call ``handler`` with the full events of each token of ``events``
        (sender, content, ...), read from ``source``, in stream order per writer.

        ``filter`` applies before any content is fetched wherever the row
        already decides (room, type, membership), and on the full event for
        the rest (sender).  Tokens with nothing left are not passed on.  An
        event the source cannot find is retried (``policy``), then passed as
        a :class:`~synrepl.events.MissingEvent`; a source that is down is
        retried for ever, and the position does not move meanwhile.  The
        handler may return an awaitable, as for :meth:`on_rows`.
        """
        self._check_followed("events")
        wanted = filter if filter is not None else EventFilter()
        self.on_rows(
            "events", lambda batch: self._full_events(batch, handler, source, wanted, policy)
        )

    def on_gap(self, handler: GapHandler) -> None:
        """Call ``handler`` when rows are known to be missing and cannot be
        fetched; it gets the exact range (``from_token < token <= upto_token``),
        in order with the stream's rows."""
        self._gap_handlers.append(handler)

    def on_reset(self, handler: ResetHandler) -> None:
        """Call ``handler`` when a writer's position went back: a
        :class:`~synrepl.positions.StreamReset` (a resettable stream's writer
        restarted) or a :class:`~synrepl.positions.WriterBehind` (our position
        was ahead of the writer's on a stream that never goes back).  State
        derived from that stream may be wrong."""
        self._reset_handlers.append(handler)

    def on_command(self, command_type: type[_C], handler: Callable[[_C], object]) -> None:
        """Call ``handler`` for every received command of ``command_type``
        (REMOTE_SERVER_UP, LOCK_RELEASED, USER_SYNC, ...).  Commands this
        instance sent itself are not passed back.  Until a command has a
        handler, its lines are skipped unparsed (they are most of the traffic)."""
        self._command_handlers.setdefault(command_type, []).append(handler)
        self._unhandled -= {getattr(command_type, "NAME", None)}

    # ------------------------------------------------------------ positions

    def positions(self) -> dict[str, dict[str, int]]:
        """What the handlers have fully processed, per stream and writer.

        Save it and pass it back as ``start`` to resume without loss."""
        return self._delivery.positions()

    def persisted_upto(self, stream: str) -> int | None:
        """The lowest processed token over the stream's writers: every row
        below it has been handled, whoever wrote it.

        The writers are those the config names for the stream (for streams it
        does not fix, such as ``caches``, those heard from); None until each
        of them has been heard from.
        """
        return self._delivery.persisted_upto(stream)

    def pending_rows(self, stream: str) -> int:
        """Rows of ``stream`` queued for the handlers (at most the bound plus a page)."""
        return self._delivery.pending_rows(stream)

    @property
    def ready(self) -> bool:
        """Whether every expected writer of every followed stream has a known
        position: from then on ``positions()`` is a complete checkpoint."""
        return self._delivery.ready

    def silent_writers(self) -> dict[str, list[str]]:
        """The expected writers with no known position yet, by stream."""
        return self._delivery.silent_writers()

    @property
    def counters(self) -> ClientCounters:
        """A typed snapshot of the running totals."""
        t = self._totals
        per_stream = self._stream_totals.values()
        wire = attrs.evolve(self._delivery.wire.counters)
        return ClientCounters(
            lines=t.lines,
            bad_lines=t.bad_lines,
            unknown_commands=t.unknown_commands,
            rows_delivered=sum(s.rows_delivered for s in per_stream),
            batches_delivered=sum(s.batches_delivered for s in per_stream),
            rows_fetched=sum(s.rows_fetched for s in per_stream),
            fetch_pages=sum(s.fetch_pages for s in per_stream),
            fetch_failures=sum(s.fetch_failures for s in per_stream),
            overflows=wire.overflows,
            gaps=sum(s.gaps for s in per_stream),
            resets=wire.resets,
            writers_behind=wire.writers_behind,
            unnamed_writer_commands=wire.unnamed_writer_commands,
            handler_errors=t.handler_errors,
            handler_retries=t.handler_retries,
            dead_letters=sum(s.dead_letters for s in per_stream),
            checkpoint_saves=t.checkpoint_saves,
            checkpoint_failures=t.checkpoint_failures,
            reconnects=t.reconnects,
            events_fetched=self._event_stats.found,
            events_missing=self._event_stats.missing,
            event_source_failures=self._event_stats.source_failures,
            wire=wire,
        )

    def measure_latency(self) -> None:
        """Start timing the handlers (two clock reads a batch), for
        :meth:`metrics`' ``handler_latency``; fetches are always timed."""
        if self._handler_started is None:
            self._handler_started = {}

    def metrics(self) -> ClientMetrics:
        """A typed snapshot of what this client measures (see
        :mod:`synrepl.metrics`); :mod:`synrepl.prometheus` exports it."""
        now = self._now()
        processed = self._delivery.positions()
        wire = self._delivery.wire.wire_positions()
        seen = self._row_seen_at
        writers = tuple(
            WriterMetrics(
                stream=stream,
                writer=writer,
                processed=processed.get(stream, {}).get(writer),
                wire=wire.get(stream, {}).get(writer),
                seconds_since_row=(
                    now - seen[stream, writer] if (stream, writer) in seen else None
                ),
            )
            for stream in merged_keys(processed, wire)
            for writer in merged_keys(processed.get(stream, {}), wire.get(stream, {}))
        )
        fetch_latency = self._fetch_latency.snapshot()
        handler_latency = self._handler_latency.snapshot()
        measured = self._handler_started is not None
        streams = []
        for stream in merged_keys(self._stream_totals, processed, wire):
            t = self._stream_totals.get(stream, _StreamTotals())
            streams.append(
                StreamMetrics(
                    stream=stream,
                    rows_delivered=t.rows_delivered,
                    batches_delivered=t.batches_delivered,
                    rows_fetched=t.rows_fetched,
                    fetch_pages=t.fetch_pages,
                    fetch_failures=t.fetch_failures,
                    gaps_unfillable=t.gaps,
                    dead_lettered_batches=t.dead_letters,
                    queued_rows=self._delivery.pending_rows(stream),
                    fetch_latency=fetch_latency.get(stream),
                    handler_latency=(
                        handler_latency.get(stream, Histogram.empty()) if measured else None
                    ),
                )
            )
        return ClientMetrics(
            instance_name=self.instance_name,
            server_name=self._config.server_name,
            connected=self._connected,
            reconnects=self._totals.reconnects,
            lines=self._totals.lines,
            bad_lines=self._totals.bad_lines,
            unknown_commands=self._totals.unknown_commands,
            handler_errors=self._totals.handler_errors,
            writers=writers,
            streams=tuple(streams),
        )

    def _totals_of(self, stream: str) -> _StreamTotals:
        totals = self._stream_totals.get(stream)
        if totals is None:
            totals = self._stream_totals[stream] = _StreamTotals()
        return totals

    def _check_followed(self, stream: str) -> None:
        if self._streams is not None and stream not in self._streams:
            raise ValueError(f"stream {stream!r} is not followed by this client")

    # ------------------------------------------------------------ sending

    def send_user_sync(
        self, user_id: str, device_id: str | None, is_syncing: bool, last_sync_ms: int
    ) -> _Sent:
        """Announce that a user started (or stopped) syncing on this instance."""
        sent = self._checked_send(
            UserSyncCommand(self.instance_name, user_id, device_id, is_syncing, last_sync_ms)
        )
        if is_syncing:
            self._syncing_users.add((user_id, device_id))
        else:
            self._syncing_users.discard((user_id, device_id))
        return sent

    def send_clear_user_sync(self) -> _Sent:
        """Forget every user sync this instance announced."""
        sent = self._checked_send(ClearUserSyncCommand(self.instance_name))
        self._syncing_users.clear()
        return sent

    def send_federation_ack(self, token: int) -> _Sent:
        """Acknowledge the federation stream up to ``token``."""
        return self._checked_send(FederationAckCommand(self.instance_name, token))

    def send_user_ip(
        self,
        user_id: str,
        access_token: str,
        ip: str,
        user_agent: str,
        device_id: str | None,
        last_seen: int,
    ) -> _Sent:
        """Report client activity (published on ``<server_name>/USER_IP``)."""
        return self._checked_send(
            UserIpCommand(user_id, access_token, ip, user_agent, device_id, last_seen)
        )

    def send_remote_server_up(self, server_name: str) -> _Sent:
        """Tell the cluster a remote server answers again."""
        return self._checked_send(RemoteServerUpCommand(server_name))

    def send_lock_released(self, lock_name: str, lock_key: str) -> _Sent:
        """Tell waiters that this instance released a lock."""
        return self._checked_send(LockReleasedCommand(self.instance_name, lock_name, lock_key))

    def send_new_active_task(self, task_id: str) -> _Sent:
        """Wake the task scheduler for ``task_id``."""
        return self._checked_send(NewActiveTaskCommand(task_id))

    def send_cancel_task(self, task_id: str) -> _Sent:
        """Ask the task scheduler to cancel ``task_id``."""
        return self._checked_send(CancelTaskCommand(task_id))

    def _checked_send(self, cmd: Command) -> _Sent:
        if self._read_only:
            raise ReadOnlyError(f"read-only replication client: not sending {cmd.NAME}")
        return self._send(cmd)

    def _clear_on_stop(self) -> Command | None:
        """The command to send before leaving: CLEAR_USER_SYNC if syncs were announced."""
        if self._syncing_users and not self._read_only:
            return ClearUserSyncCommand(self.instance_name)
        return None

    # ------------------------------------------------------------ hooks (the adapter's)

    def _new_waiter(self) -> _Sent:
        """A fresh awaitable of the adapter's kind (a Deferred, a Future),
        settled later with :meth:`_settle`."""
        raise NotImplementedError

    def _settle(self, waiter: _Sent, error: BaseException | None) -> None:
        """Resolve ``waiter`` (with None, or failing with ``error``), unless it is already."""
        raise NotImplementedError

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run one of the core's coroutines on the loop (they await the
        adapter's own awaitables only)."""
        raise NotImplementedError

    def _await_then(self, result: object, then: Callable[[BaseException | None], None]) -> None:
        """Wait for ``result`` (what a user's handler returned: a coroutine,
        Deferred, future...), then call ``then`` with None or its exception."""
        raise NotImplementedError

    def _in_thread(self, call: Callable[[], _T]) -> Awaitable[_T]:
        """``call`` run in a worker thread that never keeps the process alive."""
        raise NotImplementedError

    def _sleep(self, seconds: float) -> Awaitable[None]:
        """Something a coroutine awaits for ``seconds``."""
        raise NotImplementedError

    def _cut_at_stop(self, waiting: Awaitable[_T]) -> Awaitable[_T]:
        """``waiting``, failing at once when the client stops (a backoff, a call
        to a source that may hang): the batch is then abandoned, unprocessed."""
        raise NotImplementedError

    def _schedule(self, delay: float, call: Callable[[], None]) -> Callable[[], None]:
        """Call ``call`` on the loop after ``delay`` seconds; returns a cancel."""
        raise NotImplementedError

    # ------------------------------------------------------------ carried out with the hooks

    def _send(self, cmd: Command) -> _Sent:
        """Publish ``cmd`` as this instance; the waiter says when Redis took it."""
        return self._as_waiter(self._publish(cmd))

    async def _publish(self, cmd: Command) -> None:
        await self.transport.publish(cmd.channel(self._config.server_name), encode(cmd))

    def _on_subscribed(self) -> None:
        if self._subscribed_once is not None:
            self._settle(self._subscribed_once, None)
        if self._subscribed():

            async def replicate() -> None:
                try:
                    await self._publish(ReplicateCommand())
                except Exception as e:  # noqa: BLE001 - the next connect asks again
                    logger.warning("REPLICATE failed: %s", _describe(e))

            self._spawn(replicate())

    def _start_fetch(self, need: FetchNeeded) -> None:
        self._spawn(self._fetch(need))

    async def _fetch(self, need: FetchNeeded) -> None:
        started = self._now()
        try:
            page: StreamUpdatesLike = await self._fetcher.get_repl_stream_updates(
                need.writer, need.stream, need.from_token, need.upto_token
            )
        except Exception as e:  # noqa: BLE001 - any failure to fetch is a gap to report
            self._fetch_latency.observe(need.stream, self._now() - started)
            self._fetch_failed(need, e)
            return
        self._fetch_latency.observe(need.stream, self._now() - started)
        self._fetch_done(need, page)

    def _waiter_reached(self, key: object) -> None:
        self._settle(key, None)  # type: ignore[arg-type]  # keys are our waiters

    def _blocking(
        self,
        call: Callable[[], _T],
        then: Callable[[_T | None, BaseException | None], None],
    ) -> None:
        """Run ``call`` in a worker thread (stores and sources block); call
        ``then(result, None)`` or ``then(None, error)`` back on the loop."""

        async def run() -> None:
            try:
                result = await self._in_thread(call)
            except Exception as e:  # noqa: BLE001 - handed to ``then``
                then(None, e)
            else:
                then(result, None)

        self._spawn(run())

    def _call_later(self, delay: float, call: Callable[[], None]) -> None:
        """Call ``call`` after ``delay`` seconds, unless the client stops first."""
        cancels: list[Callable[[], None]] = []

        def fire() -> None:
            self._timers.difference_update(cancels)
            call()

        cancels.append(self._schedule(delay, fire))
        self._timers.update(cancels)

    def _became_ready(self) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            self._settle(waiter, None)

    def _stopped_loudly(self, reason: str) -> None:
        self._spawn(self._stop_sequence())

    # ------------------------------------------------------------ the public lifecycle

    def start(self) -> _Sent:
        """Resume from the checkpoint store (and read the database's positions,
        with ``seed_from``), then connect.

        The waiter is settled once subscribed for the first time; it fails if
        the checkpoint cannot be read.
        """
        return self._as_waiter(self._start_sequence())

    def stop(self, drain_timeout: float = 30.0) -> _Sent:
        """Leave cleanly: clear announced user syncs (CLEAR_USER_SYNC),
        disconnect, let the batch with the handlers finish (at most
        ``drain_timeout`` seconds) and save the last checkpoint.  Batches not
        yet handed out are delivered again after a restart."""
        return self._as_waiter(self._stop_sequence(drain_timeout))

    def finished(self) -> _Sent:
        """Settled when the client has stopped: with None after :meth:`stop`,
        failing with :class:`DeliveryStoppedError` when delivery stopped
        because a batch could be neither handled nor dead-lettered."""
        waiter = self._new_waiter()
        if self._outcome is False:
            self._finish_waiters.append(waiter)
        else:
            self._tell_finished(waiter)
        return waiter

    def wait_ready(self, timeout: float | None = None) -> _Sent:
        """Settled once every expected writer of every followed stream has a
        known position (see :attr:`ready`); after ``timeout`` seconds it
        fails with :class:`NotReadyError` naming the silent writers."""
        waiter = self._new_waiter()
        if self.ready:
            self._settle(waiter, None)
            return waiter
        self._ready_waiters.append(waiter)
        if timeout is not None:

            def too_late() -> None:
                if waiter in self._ready_waiters:
                    self._ready_waiters.remove(waiter)
                    self._settle(waiter, NotReadyError(self.silent_writers(), timeout))

            self._call_later(timeout, too_late)
        return waiter

    def wait_for_stream_position(self, stream: str, writer: str, token: int) -> _Sent:
        """Settled once the handlers have processed ``stream`` from ``writer``
        up to ``token`` (at once if they already have)."""
        self._check_followed(stream)
        waiter = self._new_waiter()
        if self._delivery.wait_for(stream, writer, token, cast(Hashable, waiter)):
            self._settle(waiter, None)
        return waiter

    def _as_waiter(self, work: Coroutine[Any, Any, None]) -> _Sent:
        waiter = self._new_waiter()

        async def run() -> None:
            try:
                await work
            except Exception as e:  # noqa: BLE001 - handed to the caller's waiter
                self._settle(waiter, e)
            else:
                self._settle(waiter, None)

        self._spawn(run())
        return waiter

    def _tell_finished(self, waiter: _Sent) -> None:
        outcome = self._outcome
        self._settle(waiter, outcome if isinstance(outcome, DeliveryStoppedError) else None)

    # ------------------------------------------------------------ starting and stopping

    async def _start_sequence(self) -> None:
        await self._load_start()
        self._subscribed_once = self._new_waiter()
        self.transport.start()
        await self._subscribed_once

    async def _load_start(self) -> None:
        """Before connecting: resume from the checkpoint store, then read the
        writers' positions from the database (``seed_from``): a "from now"
        start for writers the checkpoint does not name, a catch-up for the
        others.

        A checkpoint that cannot be read fails the start (resuming from
        nothing would skip what happened meanwhile); a seed that cannot be
        read is only a warning (the writers' own traffic will start them).
        """
        if self._checkpoint is not None:
            saved = await self._in_thread(self._checkpoint.load)
            if saved:
                logger.info("resuming from the checkpoint: %s", saved)
                self._perform(self._delivery.seed(saved))
        if self._seed_from is not None:
            # Also with a checkpoint: what was written while we were down is
            # fetched now, not at each writer's next traffic.
            try:
                positions = await self._in_thread(self._seed_from.positions)
            except Exception as e:  # noqa: BLE001 - a warning: traffic starts them anyway
                logger.warning(
                    "cannot read start positions from the database (%s); writers start "
                    "at their own next POSITION or RDATA",
                    _describe(e),
                )
            else:
                if positions:
                    self._perform(self._delivery.seed(positions))
        if self._delivery.ready:
            self._became_ready()
        elif self._silent_after is not None:
            self._call_later(self._silent_after, self._warn_silent)

    async def _stop_sequence(self, drain_timeout: float = 30.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._closing = True
        clear = self._clear_on_stop()
        if clear is not None and self.transport.subscribed:
            try:
                await self._publish(clear)
            except Exception:
                logger.warning("could not send CLEAR_USER_SYNC on stop", exc_info=True)
        await self.transport.stop()
        for cancel in list(self._timers):
            cancel()
        self._timers.clear()
        self._cut_all()
        waited = 0.0
        while not self._delivery.idle and waited < drain_timeout:
            await self._sleep(0.02)
            waited += 0.02
        if not self._delivery.idle:
            logger.warning(
                "stopping while a handler still runs (after %g s): its batch is delivered "
                "again after a restart",
                drain_timeout,
            )
        await self._final_save()
        for key in self._delivery.waiter_keys():
            self._delivery.cancel_wait(key)
            self._settle(key, SynreplError("replication client stopped"))  # type: ignore[arg-type]
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            self._settle(waiter, SynreplError("replication client stopped before it was ready"))
        for store in (self._checkpoint, self._dead_letters):
            if store is not None:
                await self._in_thread(store.close)
        self._outcome = (
            DeliveryStoppedError(self.stop_reason) if self.stop_reason is not None else None
        )
        finish, self._finish_waiters = self._finish_waiters, []
        for waiter in finish:
            self._tell_finished(waiter)

    def _cut_all(self) -> None:
        """Cut short what :meth:`_cut_at_stop` registered (the adapter's)."""

    async def _final_save(self) -> None:
        if self._checkpoint is None or not self._delivery.unsaved:
            return
        try:
            await self._in_thread(partial(self._checkpoint.save, self.positions()))
        except Exception as e:  # noqa: BLE001 - report it; the next start repeats what follows
            logger.error("cannot save the last checkpoint on stop: %s", e)

    def _warn_silent(self) -> None:
        silent = self._delivery.silent_writers()
        if silent and not self._closing:
            logger.warning(
                "no position yet, %g s after start, from: %s (a read-only client waits "
                "for each writer's own traffic)",
                self._silent_after,
                "; ".join(f"{stream}: {', '.join(names)}" for stream, names in silent.items()),
            )

    # ------------------------------------------------------------ the transport's events

    def _line_received(self, channel: str, line: str) -> None:
        self._totals.lines += 1
        if not line.startswith(_MOVES_POSITIONS) and line.partition(" ")[0] in self._unhandled:
            return  # nobody asked for it: not even parsed
        try:
            cmd = self._parse(line)
        except UnknownCommandError as e:
            self._totals.unknown_commands += 1
            self._bad_lines.warning("skipping unknown replication command %r", e.name)
            return
        except ProtocolError as e:
            self._totals.bad_lines += 1
            self._bad_lines.warning("skipping bad replication line: %s", e)
            return
        if cmd is None:
            return
        if isinstance(cmd, (RdataCommand, PositionCommand)):
            if type(cmd) is RdataCommand:
                self._row_seen_at[cmd.stream_name, cmd.instance_name] = self._now()
            actions = self._delivery.receive(cmd)
            if actions:
                self._perform(actions)
            return
        if sender_of(cmd) == self.instance_name:
            return  # our own echo
        self._call_all(self._command_handlers.get(type(cmd), ()), cmd)

    def _subscribed(self) -> bool:
        """The subscription is (re)confirmed; True if REPLICATE should be sent now."""
        self._subscriptions += 1
        self._connected = True
        if self._subscriptions > 1:
            self._totals.reconnects += 1
        return not (self._read_only or self._passive)

    def _connection_lost(self) -> None:
        self._connected = False
        self._perform(self._delivery.connection_lost())

    # ------------------------------------------------------------ fetch results

    def _fetch_done(self, need: FetchNeeded, page: StreamUpdatesLike) -> None:
        updates = self._typed(need.stream, page.updates)
        totals = self._totals_of(need.stream)
        totals.fetch_pages += 1
        totals.rows_fetched += len(updates)
        self._perform(
            self._delivery.fetched(need.stream, need.writer, updates, page.upto_token, page.limited)
        )

    def _fetch_failed(self, need: FetchNeeded, error: BaseException) -> None:
        reason = _describe(error)
        self._totals_of(need.stream).fetch_failures += 1
        logger.warning(
            "cannot fetch %s rows from %s (%d, %d]: %s",
            need.stream,
            need.writer,
            need.from_token,
            need.upto_token,
            reason,
        )
        self._perform(self._delivery.fetch_failed(need.stream, need.writer, reason))

    def _typed(self, stream: str, updates: Sequence[tuple[int, Any]]) -> list[tuple[int, AnyRow]]:
        typed: list[tuple[int, AnyRow]] = []
        for token, raw in updates:
            try:
                typed.append((int(token), parse_row(stream, raw)))
            except (MalformedRowError, TypeError, ValueError) as e:
                self._totals.bad_lines += 1
                self._bad_lines.warning("skipping bad fetched %s row: %s", stream, e)
        return typed

    # ------------------------------------------------------------ carrying actions out

    def _perform(self, actions: list[Action]) -> None:
        """Carry out actions, and those they lead to, in one loop (never recursing)."""
        self._todo.extend(actions)
        if self._performing:
            return
        self._performing = True
        try:
            todo = self._todo
            while todo:
                action = todo.popleft()
                if isinstance(action, RowsReceived):
                    if self._closing:  # left unprocessed: delivered again after a restart
                        todo.extend(self._delivery.abandoned(action))
                    else:
                        resume = self._resume_at
                        self._run_handlers(action, resume.pop(action.stream, 0) if resume else 0)
                elif isinstance(action, FetchNeeded):
                    self._start_fetch(action)
                elif isinstance(action, PositionReached):
                    self._waiter_reached(action.key)
                elif isinstance(action, SaveCheckpoint):
                    self._save(action)
                elif isinstance(action, GapUnfillable):
                    self._report_gap(action)
                elif isinstance(action, (StreamReset, WriterBehind)):
                    self._report_reset(action)
                elif isinstance(action, RetryBatch):
                    self._retry_later(action)
                elif isinstance(action, DeadLetterBatch):
                    self._dead_letter(action)
                elif isinstance(action, StopDelivery):
                    self._stop_delivery(action)
                elif isinstance(action, Ready):
                    logger.info("every expected writer has a position: %s", action.positions)
                    self._became_ready()
                else:
                    self._report_unnamed(action)
        finally:
            self._performing = False

    def _handlers_for(self, stream: str) -> list[RowHandler]:
        handlers = self._stream_handlers.get(stream)
        if handlers is None:
            handlers = self._stream_handlers[stream] = [
                *self._row_handlers.get(stream, ()),
                *self._row_handlers.get(None, ()),
            ]
        return handlers

    def _run_handlers(self, batch: RowsReceived, index: int) -> None:
        """Call the handlers from ``index`` on; the batch is done after the last."""
        handlers = self._handlers_for(batch.stream)
        started = self._handler_started
        if started is not None and batch.stream not in started:
            started[batch.stream] = self._now()
        while index < len(handlers):
            handler = handlers[index]
            try:
                result = handler(batch)
            except Exception as e:  # noqa: BLE001 - a user's handler may raise anything
                self._batch_failed(batch, index, e)
                return
            index += 1
            if result is not None:
                self._await_then(result, partial(self._handler_returned, batch, index))
                return
        if handlers:
            totals = self._totals_of(batch.stream)
            totals.rows_delivered += len(batch.rows)
            totals.batches_delivered += 1
        started = self._handler_started
        if started is not None and batch.stream in started:
            self._handler_latency.observe(batch.stream, self._now() - started.pop(batch.stream))
        actions = self._delivery.handled(batch)
        if actions:
            self._perform(actions)

    def _handler_returned(
        self, batch: RowsReceived, index: int, error: BaseException | None
    ) -> None:
        if error is not None:
            self._batch_failed(batch, index - 1, error)
        else:
            self._run_handlers(batch, index)

    def _batch_failed(self, batch: RowsReceived, index: int, error: BaseException) -> None:
        """Handler ``index`` failed on ``batch``: the failure policy decides,
        unless a stop is under way (the batch is then given up, unprocessed)."""
        if self._closing:
            self._perform(self._delivery.abandoned(batch))
            return
        self._handler_failed(error)
        if self._handler_started is not None:  # a failed try is no latency
            self._handler_started.pop(batch.stream, None)
        self._resume_at[batch.stream] = index
        self._perform(self._delivery.handler_failed(batch, _describe(error)))

    def _handler_failed(self, error: BaseException) -> None:
        self._totals.handler_errors += 1
        self._handler_errors.warning(
            "replication handler failed: %s", _describe(error), exc_info=error
        )

    def _retry_later(self, retry: RetryBatch) -> None:
        batch = retry.batch
        logger.warning(
            "handler failed on %s from %s at %d (%d times); trying again in %.1f s",
            batch.stream,
            batch.writer,
            batch.token,
            retry.failures,
            retry.delay,
        )

        def again() -> None:
            if not self._closing:
                self._totals.handler_retries += 1
                self._perform(self._delivery.retry(batch))

        self._call_later(retry.delay, again)

    def _dead_letter(self, action: DeadLetterBatch) -> None:
        store = self._dead_letters
        assert store is not None  # the policy says dead_letter only with a store
        batch = action.batch
        letter = DeadLetter(
            stream=batch.stream,
            writer=batch.writer,
            token=batch.token,
            rows=[row.to_raw() for row in batch.rows],
            error=action.error,
            attempts=action.failures,
            failed_at=time.time(),
        )

        def stored(_: object, error: BaseException | None) -> None:
            if error is not None:
                logger.error(
                    "cannot write the dead letter for %s at %d (%s); trying again in 5 s",
                    batch.stream,
                    batch.token,
                    _describe(error),
                )
                self._call_later(5.0, lambda: self._dead_letter(action))
                return
            self._totals_of(batch.stream).dead_letters += 1
            logger.error(
                "gave up on %s from %s at %d after %d failures (%s): dead-lettered",
                batch.stream,
                batch.writer,
                batch.token,
                action.failures,
                action.error,
            )
            self._perform(self._delivery.dead_lettered(batch))

        self._blocking(partial(store.add, letter), stored)

    def _stop_delivery(self, action: StopDelivery) -> None:
        batch = action.batch
        self.stop_reason = (
            f"the handlers failed {action.failures} times on {batch.stream} from "
            f"{batch.writer} at {batch.token} ({action.error}) and no dead-letter store "
            "may take it; positions stay before it"
        )
        logger.error("stopping: %s", self.stop_reason)
        self._stopped_loudly(self.stop_reason)

    def _save(self, action: SaveCheckpoint) -> None:
        store = self._checkpoint
        assert store is not None  # SaveCheckpoint comes only with a store
        self._blocking(partial(store.save, action.positions), self._saved)

    def _saved(self, _: object, error: BaseException | None) -> None:
        if error is None:
            self._totals.checkpoint_saves += 1
            self._save_failures = 0
            self._perform(self._delivery.checkpoint_saved())
            return
        self._totals.checkpoint_failures += 1
        self._save_failures += 1
        delay = min(0.5 * 2.0 ** min(self._save_failures - 1, 16), 30.0)
        logger.warning(
            "cannot save the checkpoint (%s); delivery waits, trying again in %.1f s",
            _describe(error),
            delay,
        )
        self._perform(self._delivery.checkpoint_failed())
        self._call_later(delay, lambda: self._perform(self._delivery.save_again()))

    async def _full_events(
        self,
        batch: RowsReceived,
        handler: EventsHandler,
        source: EventSource,
        wanted: EventFilter,
        policy: EventFetchPolicy | None,
    ) -> None:
        """Fetch the content of a batch's events and pass them on (on_events)."""
        rows = wanted.wanted(row for row in batch.rows if isinstance(row, EventRow))
        if not rows:
            return
        fetch = EventFetch(rows, policy, self._event_stats)
        while not isinstance(step := fetch.next(), Done):
            if self._closing:
                raise _Closing
            if isinstance(step, Fetch):
                ids = step.event_ids
                try:
                    found = await self._cut_at_stop(self._in_thread(partial(source.fetch, ids)))
                except EventSourceUnavailable as e:
                    fetch.failed(e)
                    self._source_warnings.warning(
                        "event source unavailable (%s); %s at %d waits",
                        e,
                        batch.stream,
                        batch.token,
                    )
                    continue
                fetch.got(found)
            else:
                await self._cut_at_stop(self._sleep(step.seconds))
        missing = {event.event_id: event for event in step.missing}
        for event in step.missing:
            logger.warning("no content for event %s: %s", event.event_id, event.reason)
        events: list[FullEvent | MissingEvent] = []
        passed: set[str] = set()
        for row in rows:
            if row.event_id in passed:
                continue
            passed.add(row.event_id)
            full = step.found.get(row.event_id)
            if full is None:
                events.append(missing[row.event_id])
            elif wanted.accepts(full):
                events.append(full)
        if not events:
            return
        result = handler(
            EventsReceived(batch.stream, batch.writer, batch.token, tuple(events), batch.fetched)
        )
        if result is not None and isinstance(result, Awaitable):
            await result

    def _report_gap(self, gap: GapUnfillable) -> None:
        self._totals_of(gap.stream).gaps += 1
        logger.error(
            "rows lost: %s from %s in (%d, %d]: %s",
            gap.stream,
            gap.writer,
            gap.from_token,
            gap.upto_token,
            gap.reason,
        )
        self._call_all(self._gap_handlers, gap)

    def _report_reset(self, event: StreamReset | WriterBehind) -> None:
        if isinstance(event, WriterBehind):
            logger.error(
                "%s from %s: the writer is at %d, behind our position %d, on a stream that "
                "never goes back (a checkpoint kept across a database restore?); %s",
                event.stream,
                event.writer,
                event.new_token,
                event.old_token,
                f"trusting the writer: its rows after {event.new_token} will be delivered"
                if event.trusted
                else f"keeping our position: its rows up to {event.old_token} will be dropped",
            )
        else:
            logger.info(
                "%s from %s restarted: token %d -> %d",
                event.stream,
                event.writer,
                event.old_token,
                event.new_token,
            )
        self._call_all(self._reset_handlers, event)

    def _report_unnamed(self, event: UnnamedWriter) -> None:
        logger.warning(
            "%s rows from %s, an instance the configuration does not name: they are "
            "delivered, but gaps cannot be filled from it (add it to instance_map)",
            event.stream,
            event.writer,
        )

    def _call_all(self, handlers: Sequence[Callable[[Any], object]], event: object) -> None:
        """Call each handler; failures are counted and logged, never raised."""
        for handler in handlers:
            try:
                result = handler(event)
            except Exception as e:  # noqa: BLE001 - a user's handler may raise anything
                self._handler_failed(e)
                continue
            if result is not None:
                self._await_then(result, self._handler_done)

    def _handler_done(self, error: BaseException | None) -> None:
        if error is not None:
            self._handler_failed(error)
