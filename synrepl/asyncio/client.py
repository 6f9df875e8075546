"""ReplicationClient for asyncio programs: the same client, on the same core.

The asyncio adapter of :class:`synrepl._client_core.ClientCore`, as
:mod:`synrepl.twisted.client` is the Twisted one: every delivery, position,
memory-bound, refill, checkpoint and failure rule lives in the core, and this
module only carries its actions out on the running event loop, with the
asyncio Redis transport (:mod:`synrepl.asyncio.redis_transport`) and HTTP
client (:mod:`synrepl.asyncio.http_client`).  Handlers may be coroutines;
``start()``, ``stop()``, the ``send_*`` methods and the waiters return
futures to ``await``.  Create and use the client inside a running loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from synrepl._client_core import (
    ClientCore,
    ClientCounters,
    DeliveryStoppedError,
    NotReadyError,
    PositionSource,
    ReadOnlyError,
    StreamFetcher,
    Transport,
    TransportFactory,
    logger,
)
from synrepl._ratelimit import MonotonicClock
from synrepl.config import SynapseConfig
from synrepl.connection import AttemptFailure, TransportOptions
from synrepl.delivery import HandlerFailurePolicy
from synrepl.releases import SynapseRelease

if TYPE_CHECKING:
    from synrepl.asyncio.http_client import ReplicationHttpClient
    from synrepl.checkpoints import CheckpointStore
    from synrepl.deadletters import DeadLetterStore

__all__ = (
    "ClientCounters",
    "DeliveryStoppedError",
    "NotReadyError",
    "ReadOnlyError",
    "ReplicationClient",
)

_T = TypeVar("_T")


class ReplicationClient(ClientCore["asyncio.Future[None]"]):
    """A process's membership of a Synapse cluster's replication, on asyncio.

    The arguments are those of :class:`synrepl.twisted.client.ReplicationClient`
    without the reactor: the client runs on the event loop it is started in.
    """

    def __init__(
        self,
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
        from synrepl.asyncio.redis_transport import RedisTransport

        super().__init__(
            config,
            MonotonicClock(),
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
        #: The HTTP replication client when the client built it.
        self.http: ReplicationHttpClient | None = None
        self._fetcher = fetcher if fetcher is not None else self._default_fetcher()
        self._tasks: set[asyncio.Future[Any]] = set()
        #: What a stop cuts short (see ClientCore._cut_at_stop).
        self._cuttable: set[asyncio.Future[Any]] = set()
        channels = [config.server_name, *(f"{config.server_name}/{c}" for c in extra_channels)]
        factory = transport_factory or partial(RedisTransport, config.redis)
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
        from synrepl.asyncio.http_client import ReplicationHttpClient

        http = ReplicationHttpClient(
            self._config,
            instance_name=self.instance_name,
            position_waiter=self,
            release=self.release,
        )
        self.http = http
        return http

    # ------------------------------------------------------------ hooks

    def _new_waiter(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    def _settle(self, waiter: asyncio.Future[None], error: BaseException | None) -> None:
        if not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("synrepl internal error", exc_info=task.exception())

    def _await_then(self, result: object, then: Callable[[BaseException | None], None]) -> None:
        if not isinstance(result, Awaitable):
            then(None)  # a plain value: nothing to wait for
            return
        future = asyncio.ensure_future(result)
        self._tasks.add(future)

        def done(finished: asyncio.Future[Any]) -> None:
            self._tasks.discard(finished)
            if finished.cancelled():
                then(asyncio.CancelledError())
            else:
                then(finished.exception())

        future.add_done_callback(done)

    def _in_thread(self, call: Callable[[], _T]) -> asyncio.Future[_T]:
        # A daemon thread of its own, not the loop's executor: a call stuck on
        # a frozen database must not keep the process from exiting.
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()

        def deliver(result: _T | None, error: BaseException | None) -> None:
            if future.done():  # cut short by a stop
                return
            if error is None:
                future.set_result(result)  # type: ignore[arg-type]
            else:
                future.set_exception(error)

        def run() -> None:
            try:
                result = call()
            except BaseException as e:  # noqa: BLE001 - handed to the future
                loop.call_soon_threadsafe(deliver, None, e)
            else:
                loop.call_soon_threadsafe(deliver, result, None)

        threading.Thread(target=run, name="synrepl-blocking", daemon=True).start()
        return future

    def _sleep(self, seconds: float) -> Awaitable[None]:
        return asyncio.sleep(seconds)

    def _cut_at_stop(self, waiting: Awaitable[_T]) -> asyncio.Future[_T]:
        future = asyncio.ensure_future(waiting)
        self._cuttable.add(future)
        future.add_done_callback(self._cuttable.discard)
        return future

    def _cut_all(self) -> None:
        for waiting in list(self._cuttable):
            waiting.cancel()

    def _schedule(self, delay: float, call: Callable[[], None]) -> Callable[[], None]:
        return asyncio.get_running_loop().call_later(delay, call).cancel
