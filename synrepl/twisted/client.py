"""ReplicationClient: join a Synapse cluster's replication and never miss a row.

The Twisted adapter of :class:`synrepl._client_core.ClientCore`.  It owns the
Redis connection pair (:mod:`synrepl.twisted.redis_transport`) and the HTTP
replication client, and carries out what the core decides: every delivery,
position, memory-bound and refill rule lives in :mod:`synrepl.delivery` and
:mod:`synrepl.positions`, and the handler calling and action loop in the
core, so this module holds no queue, position or waiter of its own.

Memory bound (slow handlers)
----------------------------
Each stream's delivery queue holds at most ``max_pending_rows`` rows.  Live
rows beyond that are not kept: the range is remembered and, once the handler
has worked the queue down to half the bound, fetched over HTTP from the
writer a page at a time (each next page asked for at half the bound again),
so a handler slower than its stream costs at most ``max_pending_rows`` rows
plus a page, and loses nothing.  A writer that cannot serve the range
reports it as a gap (``on_gap``).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twisted.internet import defer, task

from synrepl._client_core import (
    ClientCore,
    ClientCounters,
    DeliveryStoppedError,
    GapHandler,
    NotReadyError,
    PositionSource,
    ReadOnlyError,
    ResetHandler,
    RowHandler,
    StreamUpdatesLike,
    logger,
)
from synrepl.commands import Command, ReplicateCommand, encode
from synrepl.config import SynapseConfig
from synrepl.connection import AttemptFailure, TransportOptions
from synrepl.delivery import HandlerFailurePolicy
from synrepl.errors import SynreplError
from synrepl.positions import FetchNeeded
from synrepl.twisted.http_client import ReplicationHttpClient
from synrepl.twisted.redis_transport import RedisTransport

if TYPE_CHECKING:
    from synrepl.checkpoints import CheckpointStore
    from synrepl.deadletters import DeadLetterStore

_T = TypeVar("_T")

__all__ = (
    "ClientCounters",
    "DeliveryStoppedError",
    "HandlerFailurePolicy",
    "NotReadyError",
    "GapHandler",
    "ReadOnlyError",
    "ReplicationClient",
    "ResetHandler",
    "RowHandler",
    "StreamFetcher",
    "StreamUpdatesLike",
)


class StreamFetcher(Protocol):
    """What the client needs from the HTTP replication client: one page of a
    writer's stream history, ``from_token < token <= upto_token``."""

    def get_repl_stream_updates(
        self, instance: str, stream: str, from_token: int, upto_token: int
    ) -> Any: ...


class ReplicationClient(ClientCore["defer.Deferred[None]"]):
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
        extra_channels: more channels to subscribe to, as suffixes of
            ``<server_name>/`` (``USER_IP``).
        fetcher: the HTTP replication client (default: one built from config).
        max_pending_rows: the per-stream memory bound, see the module docs.
        trust_writer: when a writer's POSITION is behind our position on a
            stream that never goes back (a checkpoint kept across a database
            restore), take the writer's position (the default: its history is
            the truth) or keep ours.  Either way it is logged and reported to
            ``on_reset``.
        transport_options: Redis keepalive, backoff, timeouts, client name.
        on_connection_failure: called with each failed Redis connection attempt
            (why it failed, for a caller that reports it).
        checkpoint: a checkpoint store (``synrepl.checkpoints``): the client
            resumes from it and saves to it after each handled batch, and a
            stream's next batch waits for that save (exclusive with ``start``).
        dead_letters: a dead-letter store (``synrepl.deadletters``) for
            batches the handlers keep failing on.
        failure_policy: how often a failing batch is retried and what then
            (default: 5 retries, then dead-letter if a store is given, else
            stop the client).
        seed_from: an event source (``synrepl.events``) to read "from now"
            positions from before any writer speaks.
        silent_after: seconds after start to log the writers still silent.
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
        trust_writer: bool = True,
        transport_options: TransportOptions | None = None,
        on_connection_failure: Callable[[AttemptFailure], None] | None = None,
        checkpoint: CheckpointStore | None = None,
        dead_letters: DeadLetterStore | None = None,
        failure_policy: HandlerFailurePolicy | None = None,
        seed_from: PositionSource | None = None,
        silent_after: float | None = 30.0,
    ) -> None:
        super().__init__(
            config,
            reactor,
            instance_name=instance_name,
            streams=streams,
            start=start,
            read_only=read_only,
            passive=passive,
            max_pending_rows=max_pending_rows,
            trust_writer=trust_writer,
            checkpoint=checkpoint,
            dead_letters=dead_letters,
            failure_policy=failure_policy,
            seed_from=seed_from,
            silent_after=silent_after,
        )
        self._reactor = reactor
        #: The HTTP replication client (typed stubs for every endpoint) when the
        #: client built it; its stubs wait for read-after-write positions here.
        self.http: ReplicationHttpClient | None = None
        self._fetcher = fetcher if fetcher is not None else self._default_fetcher()
        self._subscribed_once: defer.Deferred[None] = defer.Deferred()
        self._stopped = False
        self._ready_waiters: list[defer.Deferred[None]] = []
        #: Deferreds from finished(), and the outcome once stopped.
        self._finish_waiters: list[defer.Deferred[None]] = []
        self._outcome: DeliveryStoppedError | bool | None = False
        self._timers: set[Any] = set()
        #: What a stop cuts short (see ClientCore._cut_at_stop).
        self._cuttable: set[defer.Deferred[Any]] = set()
        channels = [config.server_name, *(f"{config.server_name}/{c}" for c in extra_channels)]
        #: The Redis connection pair underneath.
        self.transport = RedisTransport(
            reactor,
            config.redis,
            channels,
            on_line=self._line_received,
            on_subscribed=self._on_subscribed,
            on_connection_lost=self._connection_lost,
            on_attempt_failed=on_connection_failure,
            publish_enabled=not read_only,
            options=transport_options or TransportOptions(),
        )

    def _default_fetcher(self) -> StreamFetcher:
        # Our own name matters: answers whose positions were written by the
        # instance we are would otherwise not be waited for.
        http = ReplicationHttpClient(
            self._reactor, self._config, instance_name=self.instance_name, position_waiter=self
        )
        self.http = http
        return http

    # ------------------------------------------------------------ lifecycle

    def start(self) -> defer.Deferred[None]:
        """Resume from the checkpoint store (or seed positions), then connect.

        The Deferred fires once subscribed for the first time; it fails if
        the checkpoint cannot be read.
        """
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        prepared: defer.Deferred[None] = defer.Deferred()
        self._prepare(
            lambda error: prepared.callback(None) if error is None else prepared.errback(error)
        )
        await prepared
        self.transport.start()
        await self._subscribed_once

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Leave cleanly: clear announced user syncs (CLEAR_USER_SYNC),
        disconnect, let the batch with the handlers finish (at most
        ``drain_timeout`` seconds) and save the last checkpoint.  Batches not
        yet handed out are fetched again after a restart."""
        if self._stopped:
            return
        self._stopped = True
        self._closing = True
        clear = self._clear_on_stop()
        if clear is not None and self.transport.subscribed:
            try:
                await self._publish(clear)
            except Exception:  # noqa: BLE001 - leaving must not fail on a lost connection
                logger.warning("could not send CLEAR_USER_SYNC on stop", exc_info=True)
        await self.transport.stop()
        for waiting in list(self._cuttable):
            waiting.cancel()
        waited = 0.0
        while not self._delivery.idle and waited < drain_timeout:
            await task.deferLater(self._reactor, 0.02, lambda: None)
            waited += 0.02
        if not self._delivery.idle:
            logger.warning(
                "stopping while a handler still runs (after %g s): its batch is delivered "
                "again after a restart",
                drain_timeout,
            )
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        await self._final_save()
        for key in self._delivery.waiter_keys():
            self._delivery.cancel_wait(key)
            if isinstance(key, defer.Deferred) and not key.called:
                key.errback(SynreplError("replication client stopped"))
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(SynreplError("replication client stopped before it was ready"))
        for store in (self._checkpoint, self._dead_letters):
            if store is not None:
                await self._in_thread(store.close)
        self._outcome = (
            DeliveryStoppedError(self.stop_reason) if self.stop_reason is not None else None
        )
        waiters, self._finish_waiters = self._finish_waiters, []
        for waiter in waiters:
            self._tell_finished(waiter)

    async def _final_save(self) -> None:
        if self._checkpoint is None or not self._delivery.unsaved:
            return
        try:
            await self._in_thread(partial(self._checkpoint.save, self.positions()))
        except Exception as e:  # noqa: BLE001 - report it; the next start repeats what follows
            logger.error("cannot save the last checkpoint on stop: %s", e)

    def finished(self) -> defer.Deferred[None]:
        """Fires when the client has stopped: with None after :meth:`stop`,
        failing with :class:`DeliveryStoppedError` when delivery stopped
        because a batch could be neither handled nor dead-lettered."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._outcome is False:
            self._finish_waiters.append(waiter)
        else:
            self._tell_finished(waiter)
        return waiter

    def _tell_finished(self, waiter: defer.Deferred[None]) -> None:
        if isinstance(self._outcome, DeliveryStoppedError):
            waiter.errback(self._outcome)
        else:
            waiter.callback(None)

    def wait_ready(self, timeout: float | None = None) -> defer.Deferred[None]:
        """Fires once every expected writer of every followed stream has a
        known position (see :attr:`ready`); after ``timeout`` seconds it
        fails with :class:`NotReadyError` naming the silent writers."""
        if self.ready:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._ready_waiters.append(waiter)
        if timeout is not None:

            def too_late() -> None:
                if not waiter.called:
                    self._ready_waiters.remove(waiter)
                    waiter.errback(NotReadyError(self.silent_writers(), timeout))

            self._call_later(timeout, too_late)
        return waiter

    # ------------------------------------------------------------ waiting

    def wait_for_stream_position(
        self, stream: str, writer: str, token: int
    ) -> defer.Deferred[None]:
        """Fires once the handlers have processed ``stream`` from ``writer``
        up to ``token`` (at once if they already have)."""
        self._check_followed(stream)
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._delivery.wait_for(stream, writer, token, waiter):
            waiter.callback(None)
        return waiter

    # ------------------------------------------------------------ hooks

    def _send(self, cmd: Command) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._publish(cmd))

    async def _publish(self, cmd: Command) -> None:
        await self.transport.publish(cmd.channel(self._config.server_name), encode(cmd))

    def _on_subscribed(self) -> None:
        if not self._subscribed_once.called:
            self._subscribed_once.callback(None)
        if self._subscribed():
            d = defer.ensureDeferred(self._publish(ReplicateCommand()))
            d.addErrback(lambda f: logger.warning("REPLICATE failed: %s", f.getErrorMessage()))

    def _start_fetch(self, need: FetchNeeded) -> None:
        defer.ensureDeferred(self._fetch(need))

    async def _fetch(self, need: FetchNeeded) -> None:
        try:
            page: StreamUpdatesLike = await self._fetcher.get_repl_stream_updates(
                need.writer, need.stream, need.from_token, need.upto_token
            )
        except Exception as e:  # noqa: BLE001 - any failure to fetch is a gap to report
            self._fetch_failed(need, e)
            return
        self._fetch_done(need, page)

    def _await_then(self, result: object, then: Callable[[BaseException | None], None]) -> None:
        d: defer.Deferred[object]
        if isinstance(result, defer.Deferred):
            d = result
        elif isinstance(result, Coroutine):
            d = defer.ensureDeferred(result)
        elif isinstance(result, Awaitable):
            d = defer.ensureDeferred(_awaited(result))
        else:  # a plain value: nothing to wait for
            then(None)
            return
        d.addCallbacks(lambda _: then(None), lambda f: then(f.value))

    def _waiter_reached(self, key: object) -> None:
        if isinstance(key, defer.Deferred) and not key.called:
            key.callback(None)

    def _in_thread(self, call: Callable[[], _T]) -> defer.Deferred[_T]:
        # A daemon thread of its own, not the reactor's pool: a call stuck on
        # a frozen database must not keep the process from exiting.
        d: defer.Deferred[_T] = defer.Deferred()

        def run() -> None:
            try:
                result = call()
            except BaseException as e:  # noqa: BLE001 - handed to the Deferred
                self._reactor.callFromThread(d.errback, e)
            else:
                self._reactor.callFromThread(d.callback, result)

        threading.Thread(target=run, name="synrepl-blocking", daemon=True).start()
        return d

    def _sleep(self, seconds: float) -> defer.Deferred[None]:
        return task.deferLater(self._reactor, seconds, lambda: None)

    def _cut_at_stop(self, waiting: Awaitable[_T]) -> defer.Deferred[_T]:
        d = waiting if isinstance(waiting, defer.Deferred) else defer.ensureDeferred(waiting)  # type: ignore[arg-type]
        self._cuttable.add(d)
        d.addBoth(self._uncut, d)
        return d

    def _uncut(self, result: object, d: defer.Deferred[Any]) -> object:
        self._cuttable.discard(d)
        return result

    def _blocking(
        self,
        call: Callable[[], _T],
        then: Callable[[_T | None, BaseException | None], None],
    ) -> None:
        self._in_thread(call).addCallbacks(
            lambda result: then(result, None), lambda f: then(None, f.value)
        )

    def _call_later(self, delay: float, call: Callable[[], None]) -> None:
        def fire() -> None:
            self._timers.discard(timer)
            call()

        timer = self._reactor.callLater(delay, fire)
        self._timers.add(timer)

    def _became_ready(self) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    def _stopped_loudly(self, reason: str) -> None:
        defer.ensureDeferred(self.stop())


async def _awaited(awaitable: Awaitable[object]) -> object:
    return await awaitable
