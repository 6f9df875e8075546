"""The Redis connection pair under replication, on asyncio: subscribe, publish, stay connected.

The twin of :mod:`synrepl.twisted.redis_transport`, with the same public
shape and the same behaviour, so the client core can drive either.  A
Synapse process talks to its cluster through one Redis over two
connections: one SUBSCRIBEs to the replication channels (a subscribed
connection cannot publish), the other PUBLISHes.  :class:`RedisTransport`
keeps such a pair alive on the running asyncio event loop and hands every
received message up as text.  It knows nothing about commands: the caller
parses the lines.

It uses asyncio's own transports (``loop.create_connection``, with an
``ssl.SSLContext`` for TLS, or ``loop.create_unix_connection``) and
hiredis's reply parser where installed (the pure-Python one of
:mod:`synrepl._resp` otherwise); not redis-py, whose pub/sub re-subscribes
by itself after a reconnect, and which the benchmark
``benchmarks/bench_e2e.py`` measures as several times slower.

Every rule it follows (options, set-up sequence, backoff, keepalive,
counters, the callback contract, what is logged when, what a message
becomes) is in :mod:`synrepl.connection`; the modules here only carry them
out:

- ``_redis_protocol``: one connection (an ``asyncio.Protocol``: commands,
  replies, pub/sub pushes, a read loop that can pause between two replies);
- ``_redis_link``: one link's reconnect loop (a task), set-up and keepalive
  timers;
- ``_redis_endpoint``: TCP, TLS or unix socket;
- this module: the pair, its callbacks and ``publish()``.

Callbacks
---------
``on_subscribed`` runs once the subscriber has every channel confirmed *and*
the publisher (unless ``publish_enabled=False``) is ready, so the caller can
publish REPLICATE from a task it starts inside it.  ``on_connection_lost``
runs once when that subscriber connection ends, including the close made by
``stop()``.  The two strictly alternate, starting with ``on_subscribed``;
failed attempts in between call neither, but each calls
``on_attempt_failed`` (if given) with an
:class:`~synrepl.connection.AttemptFailure` saying which link and why.  A
message that arrives after the subscription is confirmed but before
``on_subscribed`` (the publisher still connecting) is delivered, not held
back.  Callbacks are plain functions, called on the loop; they must not
block it.

Bad input and errors
--------------------
Messages that are not UTF-8 are counted and skipped; blank ones are counted
and ignored; an exception from a callback is logged and counted.  None of
these affects the connection.  Such warnings are rate-limited, and message
contents are never logged (a ``USER_IP`` line carries an access token);
neither is the Redis password.

Backpressure
------------
:meth:`RedisTransport.pause_reading` stops reading the subscriber's socket
(including replies already received but not yet handed up) until
:meth:`RedisTransport.resume_reading`; it may be called from inside
``on_line``.  Keepalive PINGs are suspended meanwhile.  Redis itself
disconnects a subscriber that falls too far behind (its
``client-output-buffer-limit pubsub``); the transport then reconnects, and
the messages in between are lost, as on any reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from synrepl import _resp
from synrepl._ratelimit import MonotonicClock
from synrepl._resp import ReplyError
from synrepl.asyncio._redis_endpoint import make_opener
from synrepl.asyncio._redis_link import Link
from synrepl.asyncio._redis_protocol import ConnectionClosedError
from synrepl.config import RedisConfig
from synrepl.connection import (
    PUBLISHER,
    SUBSCRIBER,
    AttemptFailure,
    NotConnectedError,
    PublishDisabledError,
    RedisTransportError,
    RedisTransportStats,
    TransportOptions,
    TransportState,
)

__all__ = (
    "RedisTransport",
    "RedisTransportStats",
    "RedisTransportError",
    "NotConnectedError",
    "PublishDisabledError",
    "HIREDIS",
)

logger = logging.getLogger("synrepl.redis")

#: True when replies are parsed with hiredis (the C parser): it is installed.
HIREDIS = _resp.HIREDIS


class RedisTransport:
    """A subscribing and a publishing connection to one Redis, kept alive on asyncio.

    The arguments, callbacks and errors are those of
    :class:`synrepl.twisted.redis_transport.RedisTransport`, without the
    reactor: it runs on the loop it is started in (``start()`` outside a
    running loop raises RuntimeError).  One difference: ``publish()`` raises
    :class:`PublishDisabledError` and :class:`EncodeError` when awaited.
    """

    def __init__(
        self,
        redis: RedisConfig,
        channels: Sequence[str],
        *,
        on_line: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        on_connection_lost: Callable[[], None],
        on_attempt_failed: Callable[[AttemptFailure], None] | None = None,
        publish_enabled: bool = True,
        options: TransportOptions = TransportOptions(),  # noqa: B008 - frozen
    ) -> None:
        self._core = TransportState(
            redis,
            channels,
            on_line=on_line,
            on_subscribed=on_subscribed,
            on_connection_lost=on_connection_lost,
            on_attempt_failed=on_attempt_failed,
            publish_enabled=publish_enabled,
            options=options,
            clock=MonotonicClock(),
        )
        self.channels: tuple[str, ...] = self._core.channels
        #: The options this transport was built with.
        self.options = options
        #: The transport's counters.
        self.stats: RedisTransportStats = self._core.stats
        opener = make_opener(redis, options)
        self._subscriber = Link(self._core, SUBSCRIBER, opener)
        self._publisher = Link(self._core, PUBLISHER, opener) if publish_enabled else None
        self._started = False
        self._stopping: asyncio.Task[None] | None = None

    # --- public ----------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where Redis is, for log lines (never with credentials)."""
        return self._core.address

    @property
    def parser(self) -> str:
        """``"hiredis"`` or ``"python"``: which reply parser is in use."""
        return "hiredis" if _resp.HIREDIS else "python"

    @property
    def subscribed(self) -> bool:
        """True between ``on_subscribed`` and ``on_connection_lost``."""
        return self._core.announced

    @property
    def publisher_ready(self) -> bool:
        """True while :meth:`publish` can send at once."""
        return self._publisher is not None and self._publisher.ready_connection() is not None

    @property
    def last_failure(self) -> AttemptFailure | None:
        """The latest failed connection attempt of either link (None until
        one fails; kept after a later success)."""
        return self._core.last_failure

    def start(self) -> None:
        """Open the connection(s) on the running event loop; they retry until :meth:`stop`.

        Raises:
            RuntimeError: already started (a transport is used once), or
                not called from code running on an asyncio event loop.
        """
        if self._started:
            raise RuntimeError("RedisTransport.start() was already called; make a new one")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "RedisTransport.start() must be called from code running on an asyncio "
                "event loop (inside a coroutine or a loop callback)"
            ) from None
        self._started = True
        self._subscriber.start(loop)
        if self._publisher is not None:
            self._publisher.start(loop)

    async def stop(self) -> None:
        """Close both connections and stop reconnecting.

        Returns once both are closed.  A subscribed connection still gets its
        ``on_connection_lost``.  Calling it again waits for the same outcome.
        """
        if self._stopping is None:
            self._started = True
            self._core.stop()
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        links = [self._subscriber] + ([self._publisher] if self._publisher else [])
        await asyncio.gather(*(link.stop() for link in links), return_exceptions=True)
        logger.debug("Redis transport stopped")

    async def publish(self, channel: str, message: str) -> int:
        """PUBLISH ``message`` on ``channel`` over the publishing connection.

        Returns:
            The number of subscribers that received it.  Nothing is queued.

        Raises:
            PublishDisabledError: built with ``publish_enabled=False``.
            EncodeError: the message has a newline or cannot be UTF-8 encoded.
            NotConnectedError: the publisher is not ready (connecting,
                reconnecting or stopped), or was lost before Redis answered.
            RedisTransportError: Redis refused the command.
        """
        core = self._core
        data = core.publish_payload(message)
        link = self._publisher
        conn = link.ready_connection() if link is not None else None
        if conn is None:
            raise core.publisher_unavailable()
        try:
            receivers = await conn.command("PUBLISH", channel, data)
        except ReplyError as e:
            raise core.publish_refused(core.describe(e, redis_reply=True)) from None
        except ConnectionClosedError as e:
            raise core.publish_lost(core.describe(e, redis_reply=False)) from None
        return core.published(receivers)

    def pause_reading(self) -> None:
        """Stop reading the subscriber connection until :meth:`resume_reading`."""
        self._core.reading_paused = True
        self._subscriber.set_paused(True)

    def resume_reading(self) -> None:
        """Read (and deliver) again after :meth:`pause_reading`."""
        self._core.reading_paused = False
        self._subscriber.set_paused(False)

    def __repr__(self) -> str:
        state = "subscribed" if self._core.announced else "not subscribed"
        return f"<RedisTransport {self.address} {state}>"
