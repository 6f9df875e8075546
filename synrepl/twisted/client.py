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

from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from typing import Any, Protocol

from twisted.internet import defer

from synrepl._client_core import (
    ClientCore,
    ClientCounters,
    GapHandler,
    ReadOnlyError,
    ResetHandler,
    RowHandler,
    StreamUpdatesLike,
    logger,
)
from synrepl.commands import Command, ReplicateCommand, encode
from synrepl.config import SynapseConfig
from synrepl.connection import AttemptFailure, TransportOptions
from synrepl.errors import SynreplError
from synrepl.positions import FetchNeeded
from synrepl.twisted.http_client import ReplicationHttpClient
from synrepl.twisted.redis_transport import RedisTransport

__all__ = (
    "ClientCounters",
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
        )
        self._reactor = reactor
        #: The HTTP replication client (typed stubs for every endpoint) when the
        #: client built it; its stubs wait for read-after-write positions here.
        self.http: ReplicationHttpClient | None = None
        self._fetcher = fetcher if fetcher is not None else self._default_fetcher()
        self._subscribed_once: defer.Deferred[None] = defer.Deferred()
        self._stopped = False
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
        """Connect; the Deferred fires once subscribed for the first time."""
        self.transport.start()
        return self._subscribed_once

    async def stop(self) -> None:
        """Leave: clear announced user syncs (CLEAR_USER_SYNC), then disconnect."""
        if self._stopped:
            return
        self._stopped = True
        clear = self._clear_on_stop()
        if clear is not None and self.transport.subscribed:
            try:
                await self._publish(clear)
            except Exception:  # noqa: BLE001 - leaving must not fail on a lost connection
                logger.warning("could not send CLEAR_USER_SYNC on stop", exc_info=True)
        for key in self._delivery.waiter_keys():
            self._delivery.cancel_wait(key)
            if isinstance(key, defer.Deferred) and not key.called:
                key.errback(SynreplError("replication client stopped"))
        await self.transport.stop()

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


async def _awaited(awaitable: Awaitable[object]) -> object:
    return await awaitable
