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

import asyncio
import threading
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import defer, task
from twisted.python.failure import Failure

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
    StreamFetcher,
    StreamUpdatesLike,
    Transport,
    TransportFactory,
    logger,
)
from synrepl.config import SynapseConfig
from synrepl.connection import AttemptFailure, TransportOptions
from synrepl.delivery import HandlerFailurePolicy
from synrepl.releases import SynapseRelease
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
        transport_factory: builds the transport instead of a
            ``RedisTransport`` on ``config.redis``: pass
            ``synrepl.testing.memory.MemoryRedis(clock).connect`` to run on
            an in-memory Redis, with ``task.Clock`` as the reactor.
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
        release: the Synapse release the cluster runs, when known
            (:func:`synrepl.releases.SynapseRelease.parse`; the HTTP client's
            ``detect_release`` finds it): only its streams are followed, and
            its HTTP client refuses the endpoints it lacks.
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
        transport_factory: TransportFactory | None = None,
        on_connection_failure: Callable[[AttemptFailure], None] | None = None,
        checkpoint: CheckpointStore | None = None,
        dead_letters: DeadLetterStore | None = None,
        failure_policy: HandlerFailurePolicy | None = None,
        seed_from: PositionSource | None = None,
        silent_after: float | None = 30.0,
        release: SynapseRelease | None = None,
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
            release=release,
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
        factory = transport_factory or partial(RedisTransport, reactor, config.redis)
        #: The Redis connection pair underneath (or what ``transport_factory`` built).
        self.transport: Transport = factory(
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
            self._reactor,
            self._config,
            instance_name=self.instance_name,
            position_waiter=self,
            release=self.release,
        )
        self.http = http
        return http

    def start(self) -> defer.Deferred[None]:
        """Resume from the checkpoint store (and read the database's positions,
        with ``seed_from``), then connect; fires once subscribed for the
        first time.

        Raises:
            RuntimeError: the reactor is Twisted's asyncio reactor and it is
                not running (its thread pool would never resolve Redis's
                host): call ``reactor.startRunning()``, or use
                ``synrepl.asyncio``.
        """
        if _is_asyncio_reactor(self._reactor) and not self._reactor.running:
            raise RuntimeError(
                "the Twisted asyncio reactor is not running, so this client could never "
                "connect: call reactor.startRunning() first, or use synrepl.asyncio"
            )
        return super().start()

    # ------------------------------------------------------------ hooks

    def _new_waiter(self) -> defer.Deferred[None]:
        return defer.Deferred()

    def _settle(self, waiter: defer.Deferred[None], error: BaseException | None) -> None:
        if not waiter.called:
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(error)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        defer.ensureDeferred(work).addErrback(
            lambda f: logger.error("synrepl internal error: %s", f.getTraceback())
        )

    def _await_then(self, result: object, then: Callable[[BaseException | None], None]) -> None:
        d: defer.Deferred[object]
        if isinstance(result, defer.Deferred):
            d = result
        elif isinstance(result, Coroutine):
            d = _drive(result)
        elif isinstance(result, Awaitable):
            d = _drive(_awaited(result))
        else:  # a plain value: nothing to wait for
            then(None)
            return
        d.addCallbacks(lambda _: then(None), lambda f: then(f.value))

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

    def _cut_all(self) -> None:
        for waiting in list(self._cuttable):
            waiting.cancel()

    def _schedule(self, delay: float, call: Callable[[], None]) -> Callable[[], None]:
        timer = self._reactor.callLater(delay, call)

        def cancel() -> None:
            if timer.active():
                timer.cancel()

        return cancel


def _drive(work: Coroutine[Any, Any, Any]) -> defer.Deferred[Any]:
    """Run a handler's coroutine that awaits Deferreds, asyncio futures or both.

    Twisted's ``ensureDeferred`` knows only Deferreds and asyncio's tasks only
    futures; under Twisted's asyncio reactor a handler may well await either.
    """
    done: defer.Deferred[Any] = defer.Deferred()

    def step(error: BaseException | None = None) -> None:
        while True:
            try:
                waiting = work.throw(error) if error is not None else work.send(None)
            except StopIteration as stop:
                done.callback(stop.value)
                return
            except BaseException as e:  # noqa: BLE001 - the handler's failure, handed on
                done.errback(e)
                return
            error = None
            if isinstance(waiting, defer.Deferred):
                if waiting.called and not waiting.paused:
                    continue  # fired already: the coroutine reads its result
                waiting.addBoth(_resumed, step)
                return
            if asyncio.isfuture(waiting):
                waiting._asyncio_future_blocking = False
                waiting.add_done_callback(lambda _: step())
                return
            work.close()
            done.errback(TypeError(f"a handler's coroutine awaited {waiting!r}"))
            return

    step()
    return done


def _resumed(result: object, step: Callable[..., None]) -> object:
    """Resume the coroutine waiting on a Deferred: a failure is thrown into it
    (and so consumed here), a result it reads from the Deferred itself."""
    if isinstance(result, Failure):
        step(result.value)
        return None
    step()
    return result


def _is_asyncio_reactor(reactor: Any) -> bool:
    return hasattr(reactor, "_asyncioEventloop")


async def _awaited(awaitable: Awaitable[object]) -> object:
    return await awaitable
