"""The simulated homeserver on asyncio: the same writers as
:class:`~synrepl.testing.homeserver.FakeHomeserver`, published through an
asyncio transport (Redis in memory with
``MemoryRedis.for_asyncio().connect``, or the asyncio ``RedisTransport`` on
a real Redis), the history served in process (:meth:`AsyncioHomeserver.fetcher`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from synrepl._client_core import TransportFactory
from synrepl.connection import TransportOptions
from synrepl.testing.writers import HistoryFetcher, SimulatedWriters

__all__ = ("AsyncioHomeserver",)


class AsyncioHomeserver(SimulatedWriters):
    """Simulated stream writers on asyncio.

    Args:
        server_name: the homeserver name, which is also the Redis channel.
        writers: the writer instance names (the first is the main process).
        redis_host: the Redis to publish on (without ``transport_factory``).
        redis_port: its port.
        secret: the replication secret (kept in the configuration).
        page_limit: rows per history page.
        writes: writer -> more streams it writes (see
            :class:`~synrepl.testing.writers.SimulatedWriters`).
        transport_factory: builds the transport (default: the asyncio
            ``RedisTransport`` on ``redis_host:redis_port``).
        transport_options: the transport's options.
    """

    def __init__(
        self,
        *,
        server_name: str = "test.local",
        writers: Sequence[str] = ("master",),
        redis_host: str = "127.0.0.1",
        redis_port: int = 6379,
        secret: str | None = "synrepl-test-secret",
        page_limit: int = 100,
        writes: Mapping[str, Sequence[str]] | None = None,
        transport_factory: TransportFactory | None = None,
        transport_options: TransportOptions | None = None,
    ) -> None:
        super().__init__(
            server_name=server_name,
            writers=writers,
            redis_host=redis_host,
            redis_port=redis_port,
            secret=secret,
            page_limit=page_limit,
            writes=writes,
        )
        if transport_factory is None:
            from synrepl.asyncio.redis_transport import RedisTransport

            transport_factory = partial(RedisTransport, self._redis)
        self._transport = self._connect(transport_factory, transport_options)
        #: Messages that could not be published (Redis down): lost on the wire.
        self.publish_failures = 0
        self._ready: asyncio.Future[None] | None = None
        self._sending: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        """Connect; returns once subscribed."""
        self._ready = asyncio.get_running_loop().create_future()
        self._transport.start()
        await self._ready

    async def stop(self) -> None:
        await self._transport.stop()

    def fetcher(self) -> HistoryFetcher:
        """The writers' histories in process, for a client's ``fetcher``."""
        return HistoryFetcher(self, asyncio.sleep)

    async def publish_raw(self, line: str) -> int:
        """Publish any line as it is (garbage included) on the main channel."""
        receivers: int = await self._transport.publish(self.server_name, line)
        return receivers

    def _publish(self, line: str) -> None:
        try:
            sent = asyncio.ensure_future(self._transport.publish(self.server_name, line))
        except Exception:  # noqa: BLE001 - Redis down: lost on the wire, as for Synapse
            self.publish_failures += 1
            return
        self._sending.add(sent)
        sent.add_done_callback(self._sent)

    def _sent(self, sent: asyncio.Future[Any]) -> None:
        self._sending.discard(sent)
        if sent.cancelled() or sent.exception() is not None:
            self.publish_failures += 1

    def _announce_all(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        super()._announce_all()
