"""Shared helpers for ReplicationClient tests: a homeserver, a client, a row
collector and waiting."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet import defer, reactor, task

from synrepl.positions import RowsReceived
from synrepl.streams import EventRow
from synrepl.testing.asyncio_clock import AsyncioVirtualTime
from synrepl.testing.clock import VirtualTime
from synrepl.testing.homeserver import FakeHomeserver
from synrepl.twisted.client import ReplicationClient
from synrepl.twisted.http_client import ReplicationHttpClient

_T = TypeVar("_T")

_counter = itertools.count()


def unique_server_name() -> str:
    """A server name (so a channel) no other test or process uses."""
    return f"t{os.getpid()}-{next(_counter)}.test"


class Collector:
    """A row handler that records what it was given, in order."""

    def __init__(self) -> None:
        self.batches: list[RowsReceived] = []

    def __call__(self, batch: RowsReceived) -> None:
        self.batches.append(batch)

    def rows(self, stream: str, writer: str) -> list[tuple[int, Any]]:
        """(token, raw row) pairs received for one writer's stream, in order."""
        return [
            (b.token, r.to_raw())
            for b in self.batches
            if b.stream == stream and b.writer == writer
            for r in b.rows
        ]


def clock() -> Any:
    """The virtual clock while a scenario runs on one, else the reactor."""
    virtual = VirtualTime.running()
    return virtual.clock if virtual is not None else reactor


def scenario(body: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Any]:
    """A test run with the ``adapter`` fixture on that adapter's virtual time
    (Redis in memory, history in process): the Twisted client on a
    ``task.Clock``, the asyncio one on a ``VirtualEventLoop``.  The helpers
    below (``homeserver``, ``wait_until``, ``sleep``, ``Adapter.client``,
    ``ChannelTap``) follow the one running."""

    @functools.wraps(body)
    def test(*args: Any, **kwargs: Any) -> None:
        adapter = kwargs["adapter"]
        if adapter.name == "twisted":
            VirtualTime().run(body(*args, **kwargs))
        else:
            AsyncioVirtualTime().run(body(*args, **kwargs))

    return test


class ChannelTap:
    """What an outside subscriber sees on ``channel`` and its sub-channels:
    the in-memory Redis's record on virtual time, else a redis-py subscriber."""

    def __init__(self, channel: str) -> None:
        self._channel = channel
        self._sub: Any = None
        virtual = VirtualTime.running() or AsyncioVirtualTime.running()
        if virtual is not None:
            self._memory = virtual.redis
            self._start = len(self._memory.published)
            return
        import redis as redis_py

        self._sub = redis_py.Redis(host="127.0.0.1", port=6379).pubsub()
        self._sub.psubscribe(channel + "*")
        self._sub.get_message(timeout=1)  # the subscription confirmation

    def lines(self, quiet: float = 0.5) -> list[tuple[str, str]]:
        """(channel, line) in order; from Redis, until it is quiet for ``quiet`` s."""
        if self._sub is None:
            mine = self._channel, self._channel + "/"
            return [
                (c, line)
                for c, line in self._memory.published[self._start :]
                if c == mine[0] or c.startswith(mine[1])
            ]
        got: list[tuple[str, str]] = []
        while (message := self._sub.get_message(timeout=quiet)) is not None:
            if message["type"] == "pmessage":
                got.append((message["channel"].decode(), message["data"].decode()))
        self._sub.close()
        return got


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` on the clock until it holds, or fail after ``timeout``."""
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await sleep(0.02)
        waited += 0.02


async def poll_until(
    fetch: Callable[[], Awaitable[_T]],
    wanted: Callable[[_T], bool],
    what: str,
    timeout: float = 15.0,
    interval: float = 0.1,
) -> _T:
    """``wait_until`` for a value that must be awaited (a scrape, a query):
    fetch it until ``wanted`` holds and return it, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if wanted(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: last {value!r}")
        await sleep(interval)


async def sleep(seconds: float) -> None:
    """Let time pass: virtual on a scenario's virtual time, else real."""
    if AsyncioVirtualTime.running() is not None:
        await asyncio.sleep(seconds)
    else:
        await task.deferLater(clock(), seconds, lambda: None)


def event(n: int, room: str = "!room:test") -> EventRow:
    """An ``m.room.message`` event row made unique by ``n``."""
    return EventRow(f"$e{n}", room, "m.room.message", None, None, None, None, False, False)


async def homeserver(**kwargs: Any) -> Any:
    """A started simulated homeserver on a channel of its own: on the shared
    Redis, or in memory while a scenario runs on virtual time (an
    AsyncioHomeserver on asyncio's)."""
    virtual = VirtualTime.running() or AsyncioVirtualTime.running()
    if virtual is not None:
        return await virtual.homeserver(server_name=unique_server_name(), **kwargs)
    hs = FakeHomeserver(reactor, server_name=unique_server_name(), **kwargs)
    await hs.start()
    return hs


def client_for(hs: FakeHomeserver, **kwargs: Any) -> ReplicationClient:
    """A ReplicationClient of ``hs``'s cluster (not started): on virtual time
    it reads the homeserver's history in process."""
    virtual = VirtualTime.running()
    if virtual is not None:
        return virtual.client(hs, **kwargs)
    config = kwargs.pop("config", None) or hs.config()
    kwargs.setdefault("fetcher", ReplicationHttpClient(reactor, config))
    return ReplicationClient(reactor, config, **kwargs)


# ---------------------------------------------------------------- both adapters

ADAPTERS = ("twisted", "asyncio")


class AsyncioClientFacade:
    """The asyncio ReplicationClient as a Twisted test body awaits it: each
    future it returns is handed over as a Deferred (the unit suite runs on
    Twisted's asyncio reactor, so both share one loop)."""

    _WAITERS = frozenset(
        {
            "start",
            "stop",
            "wait_ready",
            "finished",
            "wait_for_stream_position",
            "send_user_sync",
            "send_clear_user_sync",
            "send_federation_ack",
            "send_user_ip",
            "send_remote_server_up",
            "send_lock_released",
            "send_new_active_task",
            "send_cancel_task",
        }
    )

    def __init__(self, client: Any) -> None:
        self._client = client

    @property
    def wrapped(self) -> Any:
        """The asyncio client itself (what its HTTP client waits on)."""
        return self._client

    @property
    def http(self) -> Any:
        """The client's own HTTP client, its close() a Deferred too."""
        http = self._client.http
        return None if http is None else _HttpFacade(http)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if name not in self._WAITERS:
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            return defer.Deferred.fromFuture(asyncio.ensure_future(value(*args, **kwargs)))

        return call


class _HttpFacade:
    """The asyncio HTTP client as a Twisted test body awaits it: each call
    that returns a coroutine runs as an asyncio task (aiohttp's timeouts work
    only inside one) and is handed over as a Deferred."""

    def __init__(self, http: Any) -> None:
        self._http = http

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._http, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            result = value(*args, **kwargs)
            if asyncio.iscoroutine(result):
                return defer.Deferred.fromFuture(asyncio.ensure_future(result))
            return result

        return call


def make_client(adapter: str, config: Any, **kwargs: Any) -> Any:
    """A ReplicationClient of either adapter for ``config`` (not started); the
    asyncio one behind :class:`AsyncioClientFacade`."""
    if adapter == "twisted":
        return ReplicationClient(reactor, config, **kwargs)
    from synrepl.asyncio import ReplicationClient as AsyncioClient

    return AsyncioClientFacade(AsyncioClient(config, **kwargs))


class Gate:
    """What a slow handler returns, of its adapter's kind, opened by the test."""

    def __init__(self, adapter: str) -> None:
        self._deferred: defer.Deferred[None] | None = None
        self._future: asyncio.Future[None] | None = None
        if adapter == "asyncio":
            self._future = asyncio.get_event_loop().create_future()
        else:
            self._deferred = defer.Deferred()

    @property
    def awaitable(self) -> Any:
        return self._future if self._future is not None else self._deferred

    def open(self) -> None:
        if self._future is not None:
            self._future.set_result(None)
        else:
            assert self._deferred is not None
            self._deferred.callback(None)


class Adapter:
    """One of the two ReplicationClients, for tests that run on both."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def client(self, hs: FakeHomeserver, **kwargs: Any) -> Any:
        """A ReplicationClient of ``hs``'s cluster (not started)."""
        if self.name == "twisted" and VirtualTime.running() is not None:
            return client_for(hs, **kwargs)
        virtual = AsyncioVirtualTime.running()
        if self.name == "asyncio" and virtual is not None:
            return virtual.client(hs, **kwargs)  # the client itself: the body is asyncio's
        config = kwargs.pop("config", None) or hs.config()
        return make_client(self.name, config, **kwargs)

    def gate(self) -> Gate:
        return Gate(self.name)

    def sleep(self, seconds: float) -> Any:
        """What a slow handler awaits, of the adapter's kind (virtual for Twisted)."""
        if self.name == "asyncio":
            return asyncio.sleep(seconds)
        return task.deferLater(clock(), seconds, lambda: None)

    def done(self) -> Any:
        """What a handler returns when it completes at once, of the adapter's kind."""
        gate = self.gate()
        gate.open()
        return gate.awaitable
