"""MemoryRedis holds to what the client relies on in Redis.

Each scenario runs twice: on the Twisted ``RedisTransport`` and a private
redis-server, and on a ``MemoryTransport`` and a ``MemoryRedis``, both on
the real reactor, so the in-memory server is checked against the real one
wherever the clients depend on it (order, echoes, receivers, the callback
contract around a lost connection, refused attempts, stop).  The last tests
run on ``task.Clock``: nothing there waits for real time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from client_helpers import sleep, wait_until
from redis_server import RedisServer, redis_server_available
from twisted.internet import reactor, task

from synrepl.connection import AttemptFailure, NotConnectedError, TransportOptions
from synrepl.errors import EncodeError
from synrepl.testing.memory import MemoryRedis
from synrepl.twisted.redis_transport import PublishDisabledError, RedisTransport

FAST = TransportOptions(min_backoff=0.05, max_backoff=0.2)


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.events: list[str] = []
        self.failures: list[AttemptFailure] = []
        self.on_subscribed_hook: Any = None

    def on_line(self, channel: str, line: str) -> None:
        self.lines.append((channel, line))

    def on_subscribed(self) -> None:
        self.events.append("subscribed")
        if self.on_subscribed_hook is not None:
            self.on_subscribed_hook()

    def on_connection_lost(self) -> None:
        self.events.append("lost")


class Backend:
    """A pub/sub server and transports on it, real or in memory."""

    name: str

    def transport(self, channels: list[str], rec: Recorder, **kwargs: Any) -> Any:
        raise NotImplementedError

    def publish(self, channel: str, line: str) -> int:
        """Publish from outside any transport."""
        raise NotImplementedError

    def drop_connections(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def subscribers(self, channel: str) -> int:
        raise NotImplementedError


class RealRedis(Backend):
    name = "redis"

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.control = server.client()

    def transport(self, channels: list[str], rec: Recorder, **kwargs: Any) -> Any:
        return RedisTransport(
            reactor,
            self.server.redis_config(),
            channels,
            on_line=rec.on_line,
            on_subscribed=rec.on_subscribed,
            on_connection_lost=rec.on_connection_lost,
            on_attempt_failed=rec.failures.append,
            options=FAST,
            **kwargs,
        )

    def publish(self, channel: str, line: str) -> int:
        return int(self.control.publish(channel, line))

    def drop_connections(self) -> None:
        me = self.control.client_id()
        for client in self.control.client_list():
            if int(client["id"]) != me:
                self.control.client_kill_filter(_id=int(client["id"]))

    def kill(self) -> None:
        self.server.kill()

    def start(self) -> None:
        self.server.start()
        self.control = self.server.client()

    def subscribers(self, channel: str) -> int:
        ((_, count),) = self.control.pubsub_numsub(channel)
        return int(count)


class InMemory(Backend):
    name = "memory"

    def __init__(self) -> None:
        self.redis = MemoryRedis(reactor)

    def transport(self, channels: list[str], rec: Recorder, **kwargs: Any) -> Any:
        return self.redis.connect(
            channels,
            on_line=rec.on_line,
            on_subscribed=rec.on_subscribed,
            on_connection_lost=rec.on_connection_lost,
            on_attempt_failed=rec.failures.append,
            options=FAST,
            **kwargs,
        )

    def publish(self, channel: str, line: str) -> int:
        return self.redis.publish(channel, line)

    def drop_connections(self) -> None:
        self.redis.drop_connections()

    def kill(self) -> None:
        self.redis.kill()

    def start(self) -> None:
        self.redis.start()

    def subscribers(self, channel: str) -> int:
        return self.redis.subscribers(channel)


@pytest.fixture(params=["redis", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        yield InMemory()
        return
    if not redis_server_available():
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path) as server:
        yield RealRedis(server)


@pytest.fixture
def stopped() -> Iterator[list[Any]]:
    """Transports to stop after the test."""
    made: list[Any] = []
    yield made
    for transport in made:
        transport.stop()


def channel() -> str:
    return f"memory-test-{uuid.uuid4().hex}"


@pytest_twisted.ensureDeferred
async def test_order_echo_and_receivers(backend: Backend, stopped: list[Any]) -> None:
    """Messages arrive in publication order, a transport hears its own, and
    PUBLISH answers how many subscribers got it; other channels are not heard."""
    name = channel()
    a, b = Recorder(), Recorder()
    first, second = backend.transport([name], a), backend.transport([name, f"{name}/x"], b)
    stopped.extend((first, second))
    first.start()
    second.start()
    await wait_until(lambda: first.subscribed and second.subscribed, what="subscribed")
    assert backend.subscribers(name) == 2
    assert await first.publish(name, "REPLICATE") == 2
    assert backend.publish(f"{name}/x", "USER_IP a") == 1
    assert backend.publish("elsewhere", "PING 1") == 0
    for n in range(20):
        backend.publish(name, f"PING {n}")
    await wait_until(lambda: len(a.lines) == 21 and len(b.lines) == 22, what="every line")
    pings = [(name, f"PING {n}") for n in range(20)]
    assert a.lines == [(name, "REPLICATE"), *pings]
    assert b.lines == [(name, "REPLICATE"), (f"{name}/x", "USER_IP a"), *pings]


@pytest_twisted.ensureDeferred
async def test_what_on_subscribed_publishes_is_heard(backend: Backend, stopped: list[Any]) -> None:
    """Inside on_subscribed the publisher is ready and the subscription is
    counted: a REPLICATE published there comes back (Synapse's own echo)."""
    name = channel()
    rec = Recorder()
    transport = backend.transport([name], rec)
    stopped.append(transport)
    answers: list[Any] = []
    rec.on_subscribed_hook = lambda: answers.append(transport.publish(name, "REPLICATE"))
    transport.start()
    await wait_until(lambda: rec.lines == [(name, "REPLICATE")], what="the echo")
    assert await answers[0] == 1


@pytest_twisted.ensureDeferred
async def test_lost_connections_come_back_and_callbacks_alternate(
    backend: Backend, stopped: list[Any]
) -> None:
    """Every connection dropped: on_connection_lost, then (after the backoff)
    on_subscribed again, and publishing works again; nothing published while
    down is heard later."""
    name = channel()
    rec = Recorder()
    transport = backend.transport([name], rec)
    stopped.append(transport)
    transport.start()
    await wait_until(lambda: transport.subscribed, what="subscribed")
    backend.drop_connections()
    await wait_until(lambda: rec.events == ["subscribed", "lost", "subscribed"], what="back")
    await wait_until(lambda: transport.publisher_ready, what="publisher back")
    assert await transport.publish(name, "PING after") == 1
    await wait_until(lambda: rec.lines == [(name, "PING after")], what="the line")
    assert transport.stats.reconnects == 1


@pytest_twisted.ensureDeferred
async def test_a_server_that_is_down_refuses_attempts_until_it_is_back(
    backend: Backend, stopped: list[Any]
) -> None:
    name = channel()
    rec = Recorder()
    transport = backend.transport([name], rec)
    stopped.append(transport)
    transport.start()
    await wait_until(lambda: transport.subscribed, what="subscribed")
    backend.kill()
    await wait_until(lambda: len(rec.failures) >= 2, what="refused attempts")
    assert rec.events == ["subscribed", "lost"]
    assert not transport.subscribed
    with pytest.raises(NotConnectedError):
        await transport.publish(name, "PING 1")
    assert all(f.failures >= 1 for f in rec.failures)
    backend.start()
    await wait_until(lambda: rec.events == ["subscribed", "lost", "subscribed"], what="back")


@pytest_twisted.ensureDeferred
async def test_publish_errors_and_stop(backend: Backend, stopped: list[Any]) -> None:
    """A newline is refused; a transport without a publisher cannot publish;
    stop() ends with on_connection_lost and never reconnects."""
    name = channel()
    rec = Recorder()
    transport = backend.transport([name], rec)
    reader = backend.transport([name], Recorder(), publish_enabled=False)
    stopped.append(reader)
    transport.start()
    await wait_until(lambda: transport.subscribed, what="subscribed")
    with pytest.raises(EncodeError):
        transport.publish(name, "RDATA a\nb")
    with pytest.raises(PublishDisabledError):
        reader.publish(name, "PING 1")
    await transport.stop()
    assert rec.events == ["subscribed", "lost"]
    await wait_until(lambda: backend.subscribers(name) == 0, what="unsubscribed")
    assert backend.publish(name, "PING late") == 0
    await sleep(0.2)
    assert rec.lines == [] and rec.events == ["subscribed", "lost"]


# ---------------------------------------------------------------- on task.Clock


def test_on_a_clock_nothing_happens_until_time_is_moved() -> None:
    clock = task.Clock()
    redis_ = MemoryRedis(clock)
    rec = Recorder()
    name = channel()
    transport = redis_.connect(
        [name],
        on_line=rec.on_line,
        on_subscribed=rec.on_subscribed,
        on_connection_lost=rec.on_connection_lost,
        options=TransportOptions(min_backoff=1.0, max_backoff=8.0),
    )
    transport.start()
    assert rec.events == []
    clock.advance(0)
    assert rec.events == ["subscribed"]
    transport.publish(name, "PING 1")
    assert rec.lines == []  # never inside the publishing call
    clock.advance(0)
    assert rec.lines == [(name, "PING 1")]
    redis_.drop_connections()
    assert rec.events == ["subscribed", "lost"]
    clock.advance(0.49)
    assert rec.events == ["subscribed", "lost"]  # the backoff: between 0.5 and 1 s
    clock.advance(0.51)
    assert rec.events == ["subscribed", "lost", "subscribed"]
    assert redis_.published == [(name, "PING 1")]


def test_the_memory_transport_refuses_a_second_start() -> None:
    redis_ = MemoryRedis(task.Clock())
    transport = redis_.connect(
        ["c"],
        on_line=lambda c, m: None,
        on_subscribed=lambda: None,
        on_connection_lost=lambda: None,
    )
    transport.start()
    with pytest.raises(RuntimeError, match="already called"):
        transport.start()


def test_the_real_transport_is_what_the_memory_one_stands_for() -> None:
    """Same public surface as RedisTransport where clients use it."""
    wanted = {"start", "stop", "publish", "subscribed", "publisher_ready", "stats", "channels"}
    memory = MemoryRedis(task.Clock()).connect(
        ["c"],
        on_line=lambda c, m: None,
        on_subscribed=lambda: None,
        on_connection_lost=lambda: None,
    )
    assert wanted <= set(dir(RedisTransport)) | {"stats", "channels"}
    assert all(hasattr(memory, name) for name in wanted)
