"""ReplicationClient: join a Synapse cluster's replication and never miss a row.

It wires the pieces together: the Redis connection pair
(:mod:`synrepl.twisted.redis_transport`) brings lines in, :func:`parse_line`
types them, :class:`~synrepl.positions.StreamPositions` decides what each one
means, gaps are fetched over HTTP from the writer, and the user's handlers
receive one token's rows at a time, per stream in order, streams independent.

Memory bound (slow handlers)
----------------------------
Each stream's delivery queue holds at most ``max_pending_rows`` rows.  When a
row would go past that, the client stops queueing that writer's rows and
remembers only the range it skipped, ``(last queued token, newest token]``.
Once the handler has worked the queue down to half the bound, the skipped
range is fetched over HTTP from the writer, a page at a time, and delivered
in order before live rows for that writer are queued again.  So a handler
slower than its stream costs at most ``max_pending_rows`` queued rows plus one
page, never unbounded memory, and loses nothing: the rows come back from the
writer's history.  A stream whose writer keeps no history (typing) or cannot
be reached reports the skipped range as a gap instead (see ``on_gap``).
"""

from __future__ import annotations

import logging
import secrets
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet import defer

from synrepl.commands import (
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
)
from synrepl.config import SynapseConfig
from synrepl.errors import MalformedRowError, ProtocolError, SynreplError, UnknownCommandError
from synrepl.positions import (
    Event,
    FetchNeeded,
    GapUnfillable,
    PositionAdvanced,
    PositionReached,
    RowsReceived,
    StreamPositions,
    StreamReset,
)
from synrepl.streams import AnyRow, parse_row
from synrepl.twisted._ratelimit import RateLimitedWarning
from synrepl.twisted.http_client import ReplicationHttpClient
from synrepl.twisted.redis_transport import RedisTransport

__all__ = (
    "ReadOnlyError",
    "ReplicationClient",
    "RowHandler",
    "StreamFetcher",
    "StreamUpdatesLike",
)

logger = logging.getLogger("synrepl.client")

_C = TypeVar("_C", bound=Command)

#: What a row handler gets: one token's rows of one writer (``RowsReceived``
#: has ``stream``, ``writer``, ``token``, ``rows`` and ``fetched``).
RowHandler = Callable[[RowsReceived], "Awaitable[None] | defer.Deferred[None] | None"]
GapHandler = Callable[[GapUnfillable], None]
CommandHandler = Callable[[_C], object]


class ReadOnlyError(SynreplError, RuntimeError):
    """The client was asked to publish while in read-only mode."""


class StreamUpdatesLike(Protocol):
    """One page of ``get_repl_stream_updates``."""

    @property
    def updates(self) -> list[tuple[int, Any]]: ...

    @property
    def upto_token(self) -> int: ...

    @property
    def limited(self) -> bool: ...


class StreamFetcher(Protocol):
    """What the client needs from the HTTP replication client: one page of a
    writer's stream history, ``from_token < token <= upto_token``."""

    def get_repl_stream_updates(
        self, instance: str, stream: str, from_token: int, upto_token: int
    ) -> Awaitable[StreamUpdatesLike]: ...


@attrs.define
class _Overflow:
    """A range of one writer's rows skipped because its queue was full."""

    from_token: int
    upto_token: int
    refilling: bool = False


@attrs.define
class _StreamQueue:
    """One stream's delivery queue: events in order, and the memory account."""

    items: deque[Event] = attrs.Factory(deque)
    pending_rows: int = 0
    busy: bool = False
    overflow: dict[str, _Overflow] = attrs.Factory(dict)


class ReplicationClient:
    """A process's membership of a Synapse cluster's replication.

    Args:
        reactor: the Twisted reactor to run on.
        config: the cluster's configuration (``synrepl.config.load_config``).
        instance_name: this process's name on the wire.  Defaults to the
            config's ``worker_name``, else a random ``synrepl-...`` name (never
            ``master``: the client would then ignore the main process's rows
            as its own echoes).
        streams: the streams to follow (None: all).  Other streams' lines are
            skipped undecoded.
        start: a position map from :meth:`positions` to resume from; the client
            catches up over HTTP before going live.  Without it, it starts
            "from now" (the POSITIONs that answer its REPLICATE).
        read_only: publish nothing at all, not even REPLICATE: for observers
            that must never disturb a production cluster.
        passive: do not send REPLICATE (writers' periodic POSITIONs still
            connect streams); other commands may still be sent.
        fetcher: the HTTP replication client (default: one built from config).
        max_pending_rows: the per-stream memory bound, see the module docs.
    """

    def __init__(
        self,
        reactor: Any,
        config: SynapseConfig,
        *,
        instance_name: str | None = None,
        streams: Collection[str] | None = None,
        start: Mapping[str, Mapping[str, int]] | None = None,
        read_only: bool = False,
        passive: bool = False,
        extra_channels: Collection[str] = (),
        fetcher: StreamFetcher | None = None,
        max_pending_rows: int = 10_000,
        transport_options: Mapping[str, Any] | None = None,
    ) -> None:
        if max_pending_rows < 1:
            raise ValueError("max_pending_rows must be at least 1")
        self._reactor = reactor
        self._config = config
        self.instance_name = (
            instance_name or config.worker_name or f"synrepl-{secrets.token_hex(4)}"
        )
        self._read_only = read_only
        self._passive = passive
        self._streams = None if streams is None else frozenset(streams)
        self._start = {s: dict(w) for s, w in (start or {}).items()}
        self._max_pending_rows = max_pending_rows
        self._positions = StreamPositions(
            local_instance=self.instance_name, streams=self._streams, start=start
        )
        self._parse = SelectiveParser(streams=self._streams)
        #: The HTTP replication client (typed stubs for every endpoint) when the
        #: client built it; its stubs wait for read-after-write positions here.
        self.http: ReplicationHttpClient | None = None
        self._fetcher = fetcher if fetcher is not None else self._default_fetcher()
        self._row_handlers: dict[str | None, list[RowHandler]] = {}
        self._gap_handlers: list[GapHandler] = []
        self._command_handlers: dict[type[Command], list[Callable[[Any], object]]] = {}
        self._queues: dict[str, _StreamQueue] = {}
        self._delivered: dict[tuple[str, str], int] = {
            (s, w): t for s, writers in self._start.items() for w, t in writers.items()
        }
        self._waiters: dict[tuple[str, str], list[tuple[int, defer.Deferred[None]]]] = {}
        self._syncing_users: set[tuple[str, str | None]] = set()
        self._bad_lines = RateLimitedWarning(logger, reactor)
        self._handler_errors = RateLimitedWarning(logger, reactor)
        self._subscribed_once: defer.Deferred[None] = defer.Deferred()
        self._stopped = False
        self.counters: dict[str, int] = {
            "lines": 0,
            "bad_lines": 0,
            "unknown_commands": 0,
            "rows_delivered": 0,
            "rows_fetched": 0,
            "fetch_pages": 0,
            "overflows": 0,
            "gaps": 0,
            "handler_errors": 0,
            "reconnects": 0,
        }
        channels = [config.server_name, *(f"{config.server_name}/{c}" for c in extra_channels)]
        self._transport = RedisTransport(
            reactor,
            config.redis,
            channels,
            on_line=self._on_line,
            on_subscribed=self._on_subscribed,
            on_connection_lost=self._on_connection_lost,
            publish_enabled=not read_only,
            **dict(transport_options or {}),
        )

    def _default_fetcher(self) -> StreamFetcher:
        # Our own name matters: answers whose positions were written by the
        # instance we are would otherwise not be waited for.
        http = ReplicationHttpClient(
            self._reactor, self._config, instance_name=self.instance_name, position_waiter=self
        )
        self.http = http
        return http

    # ------------------------------------------------------------ handlers

    def on_rows(self, stream: str | None, handler: RowHandler) -> None:
        """Call ``handler`` with each token's rows of ``stream`` (None: every stream).

        Per stream, the next batch waits until the handler's Deferred or
        coroutine (if it returns one) has finished; streams do not wait for
        each other.  A handler that raises is logged and counted, and delivery
        goes on.
        """
        self._row_handlers.setdefault(stream, []).append(handler)

    def on_gap(self, handler: GapHandler) -> None:
        """Call ``handler`` when rows are known to be missing and cannot be
        fetched; it gets the exact range (``from_token < token <= upto_token``)."""
        self._gap_handlers.append(handler)

    def on_command(self, command_type: type[_C], handler: Callable[[_C], object]) -> None:
        """Call ``handler`` for every received command of ``command_type``
        (REMOTE_SERVER_UP, LOCK_RELEASED, USER_SYNC, ...).  Commands this
        instance sent itself are not passed back."""
        self._command_handlers.setdefault(command_type, []).append(handler)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> defer.Deferred[None]:
        """Connect; the Deferred fires once subscribed for the first time."""
        self._transport.start()
        return self._subscribed_once

    async def stop(self) -> None:
        """Leave: clear announced user syncs (CLEAR_USER_SYNC), then disconnect."""
        if self._stopped:
            return
        self._stopped = True
        if self._syncing_users and not self._read_only and self._transport.subscribed:
            try:
                await self._publish(ClearUserSyncCommand(self.instance_name))
            except Exception:
                logger.warning("could not send CLEAR_USER_SYNC on stop", exc_info=True)
        for waiters in self._waiters.values():
            for _, waiter in waiters:
                if not waiter.called:
                    waiter.errback(SynreplError("replication client stopped"))
        self._waiters.clear()
        await defer.ensureDeferred(_as_coroutine(self._transport.stop()))

    # ------------------------------------------------------------ positions

    def positions(self) -> dict[str, dict[str, int]]:
        """What the handlers have fully processed, per stream and writer.

        Save it and pass it back as ``start`` to resume without loss."""
        out: dict[str, dict[str, int]] = {}
        for (stream, writer), token in self._delivered.items():
            out.setdefault(stream, {})[writer] = token
        return out

    def persisted_upto(self, stream: str) -> int | None:
        """The lowest processed token over the stream's writers: every row
        below it has been handled, whoever wrote it.

        The writers are those the config names for the stream (for streams it
        does not fix, such as ``caches``, those heard from); None until each
        of them has been heard from.
        """
        writers = set(self._config.stream_writers.writers_for_stream(stream))
        writers |= {w for (s, w) in self._delivered if s == stream}
        writers.discard(self.instance_name)
        tokens = [self._delivered.get((stream, w)) for w in writers]
        if not tokens or any(t is None for t in tokens):
            return None
        return min(t for t in tokens if t is not None)

    def wait_for_stream_position(
        self, stream: str, writer: str, token: int
    ) -> defer.Deferred[None]:
        """Fires once the handlers have processed ``stream`` from ``writer``
        up to ``token`` (at once if they already have)."""
        if self._streams is not None and stream not in self._streams:
            raise ValueError(f"stream {stream!r} is not followed by this client")
        if self._delivered.get((stream, writer), -(2**63)) >= token:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.setdefault((stream, writer), []).append((token, waiter))
        return waiter

    # ------------------------------------------------------------ sending

    def send_user_sync(
        self, user_id: str, device_id: str | None, is_syncing: bool, last_sync_ms: int
    ) -> defer.Deferred[None]:
        """Announce that a user started (or stopped) syncing on this instance."""
        key = (user_id, device_id)
        if is_syncing:
            self._syncing_users.add(key)
        else:
            self._syncing_users.discard(key)
        return self._send(
            UserSyncCommand(self.instance_name, user_id, device_id, is_syncing, last_sync_ms)
        )

    def send_clear_user_sync(self) -> defer.Deferred[None]:
        """Forget every user sync this instance announced."""
        self._syncing_users.clear()
        return self._send(ClearUserSyncCommand(self.instance_name))

    def send_federation_ack(self, token: int) -> defer.Deferred[None]:
        """Acknowledge the federation stream up to ``token``."""
        return self._send(FederationAckCommand(self.instance_name, token))

    def send_user_ip(
        self,
        user_id: str,
        access_token: str,
        ip: str,
        user_agent: str,
        device_id: str | None,
        last_seen: int,
    ) -> defer.Deferred[None]:
        """Report client activity (published on ``<server_name>/USER_IP``)."""
        return self._send(
            UserIpCommand(user_id, access_token, ip, user_agent, device_id, last_seen)
        )

    def send_remote_server_up(self, server_name: str) -> defer.Deferred[None]:
        """Tell the cluster a remote server answers again."""
        return self._send(RemoteServerUpCommand(server_name))

    def send_lock_released(self, lock_name: str, lock_key: str) -> defer.Deferred[None]:
        """Tell waiters that this instance released a lock."""
        return self._send(LockReleasedCommand(self.instance_name, lock_name, lock_key))

    def send_new_active_task(self, task_id: str) -> defer.Deferred[None]:
        """Wake the task scheduler for ``task_id``."""
        return self._send(NewActiveTaskCommand(task_id))

    def send_cancel_task(self, task_id: str) -> defer.Deferred[None]:
        """Ask the task scheduler to cancel ``task_id``."""
        return self._send(CancelTaskCommand(task_id))

    def _send(self, cmd: Command) -> defer.Deferred[None]:
        if self._read_only:
            raise ReadOnlyError(f"read-only replication client: not sending {cmd.NAME}")
        return defer.ensureDeferred(self._publish(cmd))

    async def _publish(self, cmd: Command) -> None:
        line = encode(cmd)
        await self._transport.publish(cmd.channel(self._config.server_name), line)

    # ------------------------------------------------------------ wire in

    def _on_subscribed(self) -> None:
        if not self._subscribed_once.called:
            self._subscribed_once.callback(None)
        else:
            self.counters["reconnects"] += 1
        if not (self._read_only or self._passive):
            d = defer.ensureDeferred(self._publish(ReplicateCommand()))
            d.addErrback(lambda f: logger.warning("REPLICATE failed: %s", f.getErrorMessage()))

    def _on_connection_lost(self) -> None:
        self._handle_events(self._positions.connection_lost())

    def _on_line(self, channel: str, line: str) -> None:
        self.counters["lines"] += 1
        try:
            cmd = self._parse(line)
        except UnknownCommandError as e:
            self.counters["unknown_commands"] += 1
            self._bad_lines.warning("skipping unknown replication command %r", e.name)
            return
        except ProtocolError as e:
            self.counters["bad_lines"] += 1
            self._bad_lines.warning("skipping bad replication line: %s", e)
            return
        if cmd is None:
            return
        if isinstance(cmd, (RdataCommand, PositionCommand)):
            self._handle_events(self._positions.receive(cmd))
            return
        if _sent_by(cmd) == self.instance_name:
            return  # our own echo
        for handler in self._command_handlers.get(type(cmd), ()):
            try:
                result = handler(cmd)
                if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
                    defer.ensureDeferred(_as_coroutine(result)).addErrback(
                        lambda f: self._handler_failed(f.getTraceback())
                    )
            except Exception:  # noqa: BLE001 - a user's handler may raise anything
                self._handler_failed(traceback.format_exc())

    # ------------------------------------------------------------ events

    def _handle_events(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, FetchNeeded):
                defer.ensureDeferred(self._fetch(event))
            elif isinstance(event, PositionReached):
                pass  # waiters resolve on *processed* positions instead
            elif isinstance(event, (RowsReceived, PositionAdvanced, GapUnfillable, StreamReset)):
                self._enqueue(event)

    async def _fetch(self, need: FetchNeeded) -> None:
        """Fill one gap found by the bookkeeping: one page, then the next."""
        try:
            page = await self._fetcher.get_repl_stream_updates(
                need.writer, need.stream, need.from_token, need.upto_token
            )
            updates = self._typed(need.stream, page.updates)
        except Exception as e:  # noqa: BLE001 - any failure to fetch is a gap to report
            reason = f"{type(e).__name__}: {e}"
            logger.warning(
                "cannot fetch %s rows from %s (%d, %d]: %s",
                need.stream,
                need.writer,
                need.from_token,
                need.upto_token,
                reason,
            )
            self._handle_events(self._positions.fetch_failed(need.stream, need.writer, reason))
            return
        self.counters["fetch_pages"] += 1
        self.counters["rows_fetched"] += len(updates)
        self._handle_events(
            self._positions.fetched(
                need.stream, need.writer, updates, page.upto_token, page.limited
            )
        )

    def _typed(self, stream: str, updates: list[tuple[int, Any]]) -> list[tuple[int, AnyRow]]:
        typed: list[tuple[int, AnyRow]] = []
        for token, raw in updates:
            try:
                typed.append((int(token), parse_row(stream, raw)))
            except MalformedRowError as e:
                self.counters["bad_lines"] += 1
                self._bad_lines.warning("skipping bad fetched row: %s", e)
        return typed

    # ------------------------------------------------------------ delivery

    def _queue(self, stream: str) -> _StreamQueue:
        queue = self._queues.get(stream)
        if queue is None:
            queue = self._queues[stream] = _StreamQueue()
        return queue

    def _enqueue(self, event: Event) -> None:
        stream, writer = _pair_of(event)
        queue = self._queue(stream)
        overflow = queue.overflow.get(writer)
        if isinstance(event, RowsReceived):
            if overflow is not None:
                overflow.upto_token = max(overflow.upto_token, event.token)
                return
            if queue.pending_rows + len(event.rows) > self._max_pending_rows and queue.items:
                self.counters["overflows"] += 1
                start = self._queued_upto(stream, writer)
                queue.overflow[writer] = _Overflow(start, event.token)
                logger.warning(
                    "handler for %s is too slow: %d rows queued; rows of %s after %s "
                    "will be fetched over HTTP once it catches up",
                    stream,
                    queue.pending_rows,
                    writer,
                    start,
                )
                return
            queue.pending_rows += len(event.rows)
        elif isinstance(event, PositionAdvanced) and overflow is not None:
            overflow.upto_token = max(overflow.upto_token, event.token)
            return
        elif isinstance(event, StreamReset) and overflow is not None:
            # The writer restarted: the skipped range cannot be fetched any more.
            del queue.overflow[writer]
            queue.items.append(
                GapUnfillable(
                    stream, writer, overflow.from_token, overflow.upto_token, "writer restarted"
                )
            )
        queue.items.append(event)
        self._pump(stream)

    def _queued_upto(self, stream: str, writer: str) -> int:
        """The last token of ``writer`` already queued (or processed)."""
        queue = self._queues[stream]
        for item in reversed(queue.items):
            if getattr(item, "writer", None) == writer:
                token = _event_token(item)
                if token is not None:
                    return token
        return self._delivered.get((stream, writer), 0)

    def _pump(self, stream: str) -> None:
        queue = self._queue(stream)
        while not queue.busy and queue.items:
            event = queue.items.popleft()
            if isinstance(event, RowsReceived):
                queue.pending_rows -= len(event.rows)
                handlers = self._row_handlers.get(stream, []) + self._row_handlers.get(None, [])
                if handlers:
                    queue.busy = True
                    d = defer.ensureDeferred(self._run_handlers(handlers, event))
                    d.addBoth(self._handled, stream, event)
                    return
                self._processed(event)
            else:
                if isinstance(event, GapUnfillable):
                    self._report_gap(event)
                self._processed(event)
        self._maybe_refill(stream)

    async def _run_handlers(self, handlers: list[RowHandler], event: RowsReceived) -> None:
        for handler in handlers:
            try:
                result = handler(event)
                if result is not None:
                    await _as_coroutine(result)
            except Exception:  # noqa: BLE001 - a user's handler may raise anything
                self._handler_failed(traceback.format_exc())

    def _handled(self, result: object, stream: str, event: RowsReceived) -> None:
        queue = self._queue(stream)
        queue.busy = False
        self.counters["rows_delivered"] += len(event.rows)
        self._processed(event)
        self._pump(stream)

    def _handler_failed(self, trace: str) -> None:
        self.counters["handler_errors"] += 1
        self._handler_errors.warning("replication handler failed: %s", trace.rstrip())

    def _report_gap(self, gap: GapUnfillable) -> None:
        self.counters["gaps"] += 1
        logger.error(
            "rows lost: %s from %s in (%d, %d]: %s",
            gap.stream,
            gap.writer,
            gap.from_token,
            gap.upto_token,
            gap.reason,
        )
        for handler in self._gap_handlers:
            try:
                handler(gap)
            except Exception:  # noqa: BLE001 - a user's handler may raise anything
                self._handler_failed(traceback.format_exc())

    def _processed(self, event: Event) -> None:
        token = _event_token(event)
        if token is None:
            return
        stream, writer = _pair_of(event)
        key = (stream, writer)
        if isinstance(event, StreamReset):
            self._delivered[key] = token  # the writer's tokens start over
        elif token > self._delivered.get(key, -(2**63)):
            self._delivered[key] = token
        else:
            return
        waiters = self._waiters.get(key)
        if waiters:
            ready = [w for t, w in waiters if t <= token]
            self._waiters[key] = [(t, w) for t, w in waiters if t > token]
            for waiter in ready:
                waiter.callback(None)

    def _maybe_refill(self, stream: str) -> None:
        queue = self._queue(stream)
        if not queue.overflow or queue.pending_rows > self._max_pending_rows // 2:
            return
        for writer, overflow in queue.overflow.items():
            if not overflow.refilling:
                overflow.refilling = True
                defer.ensureDeferred(self._refill(stream, writer, overflow))
                return

    async def _refill(self, stream: str, writer: str, overflow: _Overflow) -> None:
        """Fetch the rows skipped while the queue was full, one page per wake-up."""
        queue = self._queue(stream)
        try:
            page = await self._fetcher.get_repl_stream_updates(
                writer, stream, overflow.from_token, overflow.upto_token
            )
            updates = self._typed(stream, page.updates)
        except Exception as e:  # noqa: BLE001 - any failure to fetch is a gap to report
            del queue.overflow[writer]
            queue.items.append(
                GapUnfillable(
                    stream,
                    writer,
                    overflow.from_token,
                    overflow.upto_token,
                    f"refill after overflow failed: {type(e).__name__}: {e}",
                )
            )
            self._pump(stream)
            return
        self.counters["fetch_pages"] += 1
        self.counters["rows_fetched"] += len(updates)
        by_token: dict[int, list[AnyRow]] = {}
        for token, row in updates:
            if overflow.from_token < token <= overflow.upto_token:
                by_token.setdefault(token, []).append(row)
        for token, rows in sorted(by_token.items()):
            queue.items.append(RowsReceived(stream, writer, token, tuple(rows), True))
            queue.pending_rows += len(rows)
        reached = page.upto_token if page.limited else overflow.upto_token
        overflow.from_token = max(overflow.from_token, reached)
        overflow.refilling = False
        if overflow.from_token >= overflow.upto_token:
            del queue.overflow[writer]
            queue.items.append(PositionAdvanced(stream, writer, overflow.upto_token))
        self._pump(stream)


def _pair_of(event: Event) -> tuple[str, str]:
    """(stream, writer) of a delivery event."""
    if isinstance(event, (RowsReceived, PositionAdvanced, GapUnfillable, StreamReset)):
        return event.stream, event.writer
    raise TypeError(f"not a delivery event: {event!r}")


def _event_token(event: Event) -> int | None:
    if isinstance(event, (RowsReceived, PositionAdvanced)):
        return event.token
    if isinstance(event, GapUnfillable):
        return event.upto_token
    if isinstance(event, StreamReset):
        return event.new_token
    return None


def _sent_by(cmd: Command) -> str | None:
    """The instance a command names as its sender, where it names one."""
    if isinstance(cmd, (UserSyncCommand, ClearUserSyncCommand)):
        return cmd.instance_id
    if isinstance(cmd, (FederationAckCommand, LockReleasedCommand)):
        return cmd.instance_name
    return None


async def _as_coroutine(result: Any) -> Any:
    """Await a Deferred, a coroutine or any awaitable."""
    if isinstance(result, defer.Deferred):
        return await result
    return await result
