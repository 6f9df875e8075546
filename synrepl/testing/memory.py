"""Redis pub/sub in memory, on a clock: the real client without a Redis.

:class:`MemoryRedis` is a pub/sub server that lives in the test process.
Its :meth:`~MemoryRedis.connect` builds transports with the same contract as
the Redis transports of both adapters (the same sans-IO core,
``synrepl.connection.TransportState``, calls back): pass it as
``transport_factory`` to a ``ReplicationClient`` or a ``FakeHomeserver``.
With Twisted's ``task.Clock`` as the reactor, a test decides when time
passes and nothing sleeps.

What it keeps of Redis: a subscriber gets every message published on its
channels after its subscription, in publication order, its own included;
PUBLISH answers the number of subscribers that got it; connections open,
fail and come back after the transport's backoff, on the clock; a message
is delivered after the publishing call returns, never inside it.  What it
leaves out: patterns, databases, AUTH and TLS.

Faults: :meth:`~MemoryRedis.drop_connections` (every connection lost, as
with ``CLIENT KILL`` or a restart), :meth:`~MemoryRedis.kill` (down:
attempts are refused until :meth:`~MemoryRedis.start`).

Usage (a Twisted test, no Redis, no sleeping)::

    clock = task.Clock()
    redis = MemoryRedis(clock)
    client = ReplicationClient(clock, config, transport_factory=redis.connect, ...)
    client.start()
    clock.advance(0)            # connect, subscribe, deliver
    assert redis.published[0] == ("example.com", "REPLICATE ")
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet import defer

from synrepl.config import RedisConfig
from synrepl.connection import (
    SUBSCRIBER,
    AttemptFailure,
    LinkState,
    Role,
    TransportOptions,
    TransportState,
    log_line,
)

__all__ = ("MemoryRedis", "MemoryTransport")


_ADDRESS = RedisConfig(enabled=True, host="in-memory", port=0)


class _Clock(Protocol):
    """Twisted's ``IReactorTime``, as much of it as is used here."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> Any: ...


class _LoopClock:
    """An asyncio loop seen as a Twisted clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop if self._loop is not None else asyncio.get_event_loop()

    def seconds(self) -> float:
        return self.loop.time()

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> Any:
        return _LoopCall(self.loop, delay, f, args)


class _LoopCall:
    """An asyncio timer with the ``active()``/``cancel()`` of a Twisted DelayedCall."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, delay: float, f: Callable[..., Any], args: Any
    ) -> None:
        self._done = False
        self._handle = loop.call_later(delay, self._fire, f, args)

    def _fire(self, f: Callable[..., Any], args: Any) -> None:
        self._done = True
        f(*args)

    def active(self) -> bool:
        return not self._done

    def cancel(self) -> None:
        self._done = True
        self._handle.cancel()


class MemoryRedis:
    """An in-memory Redis pub/sub server (see the module docs).

    Args:
        clock: the Twisted reactor or a ``task.Clock``; with
            :meth:`for_asyncio`, the asyncio loop.
        seed: seeds the transports' reconnect jitter (the Redis transports
            draw it at random), so that a run repeats exactly.
    """

    def __init__(self, clock: Any, *, seed: int = 0) -> None:
        # IReactorTime, typed loosely: zope interfaces do not type-check.
        self._clock: _Clock = clock
        #: The backoffs' jitter: seeded, so a run on a task.Clock repeats exactly.
        self.random = random.Random(seed)
        self._asyncio = isinstance(clock, _LoopClock)
        self._subscriptions: dict[str, list[_Link]] = {}
        # A dict, not a set: connections are dropped in the order they were
        # made, so that a run repeats exactly.
        self._links: dict[_Link, None] = {}
        self._queue: deque[tuple[_Link, int, str, str]] = deque()
        self._draining: Any = None
        #: Up: connection attempts succeed.
        self.up = True
        #: Every message published, in order: ``(channel, message)``.
        self.published: list[tuple[str, str]] = []

    @classmethod
    def for_asyncio(cls, loop: asyncio.AbstractEventLoop | None = None) -> MemoryRedis:
        """A server for the asyncio adapter, on ``loop`` (default: the running one)."""
        return cls(_LoopClock(loop))

    # --- the transport factory -------------------------------------------------------

    def connect(self, channels: Sequence[str], **callbacks: Any) -> MemoryTransport:
        """A transport on this server, not started: a ``transport_factory``
        (the arguments are :class:`MemoryTransport`'s after the server)."""
        return MemoryTransport(self, channels, **callbacks)

    # --- what a test asks and does ---------------------------------------------------

    def subscribers(self, channel: str) -> int:
        """How many connections are subscribed to ``channel`` (PUBSUB NUMSUB)."""
        return len(self._subscriptions.get(channel, ()))

    def publish(self, channel: str, message: str) -> int:
        """PUBLISH from outside any transport (a test's own line); returns the receivers."""
        self.published.append((channel, message))
        receivers = self._subscriptions.get(channel, [])
        for link in receivers:
            self._queue.append((link, link.generation, channel, message))
        if receivers and self._draining is None:
            self._draining = self._clock.callLater(0, self.flush)
        return len(receivers)

    def flush(self) -> None:
        """Deliver every message waiting, and those published meanwhile, now."""
        self._draining = None
        while self._queue:
            link, generation, channel, message = self._queue.popleft()
            if link.generation == generation and link.connected:
                link.transport._deliver(channel, message)

    def drop_connections(self) -> None:
        """Every connection is lost; the transports reconnect after their backoff."""
        for link in list(self._links):
            link.lost("connection reset by the in-memory Redis")

    def kill(self) -> None:
        """Down: every connection is lost and attempts are refused until :meth:`start`."""
        self.up = False
        self.drop_connections()

    def start(self) -> None:
        """Up again (after :meth:`kill`): the transports' next attempts succeed."""
        self.up = True

    # --- what the links do -----------------------------------------------------------

    def _attach(self, link: _Link, channels: Sequence[str]) -> None:
        self._links[link] = None
        for channel in channels:
            self._subscriptions.setdefault(channel, []).append(link)

    def _detach(self, link: _Link) -> None:
        self._links.pop(link, None)
        for channel in link.transport.channels:
            subscribed = self._subscriptions.get(channel, [])
            if link in subscribed:
                subscribed.remove(link)

    def _result(self, value: int | BaseException) -> Any:
        """A Deferred (Twisted) or a Future (asyncio) with ``value``."""
        if self._asyncio:
            assert isinstance(self._clock, _LoopClock)
            future: asyncio.Future[int] = self._clock.loop.create_future()
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)
            return future
        if isinstance(value, BaseException):
            return defer.fail(value)
        return defer.succeed(value)


class _Link:
    """One of a transport's connections, in memory."""

    def __init__(self, transport: MemoryTransport, state: LinkState) -> None:
        self.transport = transport
        self.state = state
        state.backoff = attrs.evolve(state.backoff, rng=transport.server.random.random)
        self.role: Role = state.role
        self.connected = False
        #: Grows with every connection, so a message queued for an earlier one is dropped.
        self.generation = 0
        self._timer: Any = None
        self._stopped = False

    def start(self) -> None:
        self._later(0)

    def _later(self, delay: float) -> None:
        self._timer = self.transport.server._clock.callLater(delay, self._attempt)

    def _attempt(self) -> None:
        self._timer = None
        if self._stopped:
            return
        server = self.transport.server
        now = server._clock.seconds()
        if not server.up:
            ended = self.state.ended(now, "connection refused (the in-memory Redis is down)")
            log_line(ended.log)
            assert ended.failure is not None
            self.transport.core.attempt_failed(ended.failure)
            self._later(ended.delay)
            return
        self.connected = True
        self.generation += 1
        channels = self.transport.channels if self.role == SUBSCRIBER else ()
        server._attach(self, channels)
        log_line(self.state.set_up(now).log)
        self.transport.core.link_ready()

    def lost(self, why: str) -> None:
        if not self.connected:
            return
        self.connected = False
        server = self.transport.server
        server._detach(self)
        ended = self.state.ended(server._clock.seconds(), why)
        log_line(ended.log)
        self.transport.core.link_lost(self.role)
        self._later(ended.delay)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.connected:
            self.connected = False
            self.transport.server._detach(self)
            self.state.stopped()
            self.transport.core.link_lost(self.role)


class MemoryTransport:
    """A transport on a :class:`MemoryRedis`, with the Redis transports'
    contract (see ``synrepl.twisted.redis_transport.RedisTransport``)."""

    def __init__(
        self,
        server: MemoryRedis,
        channels: Sequence[str],
        *,
        on_line: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        on_connection_lost: Callable[[], None],
        on_attempt_failed: Callable[[AttemptFailure], None] | None = None,
        publish_enabled: bool = True,
        options: TransportOptions | None = None,
    ) -> None:
        self.server = server
        self.options = options or TransportOptions()
        self.core = TransportState(
            _ADDRESS,
            channels,
            on_line=on_line,
            on_subscribed=on_subscribed,
            on_connection_lost=on_connection_lost,
            on_attempt_failed=on_attempt_failed,
            publish_enabled=publish_enabled,
            options=self.options,
            clock=server._clock,
        )
        self.channels: tuple[str, ...] = self.core.channels
        self.stats = self.core.stats
        #: What this transport published, in order: ``(channel, message)``.
        self.published: list[tuple[str, str]] = []
        self._subscriber = _Link(self, self.core.subscriber)
        self._publisher = (
            _Link(self, self.core.publisher) if self.core.publisher is not None else None
        )
        self._started = False

    @property
    def address(self) -> str:
        return self.core.address

    @property
    def last_failure(self) -> AttemptFailure | None:
        return self.core.last_failure

    @property
    def subscribed(self) -> bool:
        """True between ``on_subscribed`` and ``on_connection_lost``."""
        return self.core.announced

    @property
    def publisher_ready(self) -> bool:
        return self._publisher is not None and self._publisher.connected

    def start(self) -> None:
        """Connect (on the clock); reconnects until :meth:`stop`."""
        if self._started:
            raise RuntimeError("MemoryTransport.start() was already called; make a new one")
        self._started = True
        for link in self._links():
            link.start()

    def stop(self) -> Any:
        """Close both connections; an awaitable of the adapter's kind."""
        self._started = True
        if self.core.stop():
            for link in self._links():
                link.stop()
        return self.server._result(0)

    def publish(self, channel: str, message: str) -> Any:
        """PUBLISH; an awaitable of the adapter's kind with the receivers.

        Raises:
            PublishDisabledError: built with ``publish_enabled=False``.
            EncodeError: the message has a newline or cannot be UTF-8 encoded.
        """
        self.core.publish_payload(message)
        if self._publisher is None or not self._publisher.connected:
            return self.server._result(self.core.publisher_unavailable())
        self.published.append((channel, message))
        return self.server._result(self.core.published(self.server.publish(channel, message)))

    def _links(self) -> list[_Link]:
        return [self._subscriber] + ([self._publisher] if self._publisher is not None else [])

    def _deliver(self, channel: str, message: str) -> None:
        self.core.message(channel.encode("utf-8"), message.encode("utf-8"))

    def __repr__(self) -> str:
        state = "subscribed" if self.core.announced else "not subscribed"
        return f"<MemoryTransport {state}>"
