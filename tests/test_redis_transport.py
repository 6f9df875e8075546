"""RedisTransport, both adapters' (Twisted and asyncio), against a real Redis.

Every scenario runs once on each transport (test ids ``[twisted]`` and
``[asyncio]``): the two promise the same behaviour, so they are held to the
same tests.  A scenario is an ``async def`` that awaits only what the
:class:`Harness` gives it (``sleep``, ``wait_for``, the transport's own
``publish()``/``stop()``), so it runs under Twisted's reactor or an
asyncio event loop alike.

Tests that only subscribe and publish on their own unique channels use the
shared Redis at 127.0.0.1:6379.  Tests that kill, restart, pause or
reconfigure Redis, or count its clients, start their own redis-server
(tests/redis_server.py).  What only one adapter has is tested at the end of
this file (Twisted) or in test_redis_transport_asyncio.py.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import shutil
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from asyncio_helpers import run_in_new_loop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_server import RedisServer, TlsFiles, free_port, redis_server_available
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater

from synrepl.asyncio import redis_transport as asyncio_transport
from synrepl.config import RedisConfig
from synrepl.connection import AttemptFailure, TransportOptions
from synrepl.errors import ConfigError, EncodeError
from synrepl.twisted import redis_transport as twisted_transport
from synrepl.twisted.redis_transport import (
    HIREDIS,
    NotConnectedError,
    PublishDisabledError,
    _PythonReader,
)

#: Typed loosely: zope interfaces do not type-check.
reactor: Any = _reactor

SHARED = RedisConfig(enabled=True, host="127.0.0.1", port=6379)
LOGGER = "synrepl.redis"

needs_redis_server = pytest.mark.skipif(
    not redis_server_available(), reason="redis-server is not installed"
)


# --- helpers -------------------------------------------------------------------


class Recorder:
    """Collects what a transport hands up; ``hooks`` run inside the callbacks."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.events: list[str] = []
        self.on_subscribed_hook: Callable[[], None] | None = None
        self.on_line_hook: Callable[[str, str], None] | None = None
        self.on_lost_hook: Callable[[], None] | None = None

    def on_line(self, channel: str, line: str) -> None:
        self.lines.append((channel, line))
        if self.on_line_hook is not None:
            self.on_line_hook(channel, line)

    def on_subscribed(self) -> None:
        self.events.append("subscribed")
        if self.on_subscribed_hook is not None:
            self.on_subscribed_hook()

    def on_connection_lost(self) -> None:
        self.events.append("lost")
        if self.on_lost_hook is not None:
            self.on_lost_hook()


class Harness:
    """One transport flavour: builds its transports, runs a scenario on its
    event loop, and stops every transport it built at the end."""

    name: str

    def __init__(self) -> None:
        self.made: list[Any] = []

    def new(self, config: RedisConfig, channels: Any, **kwargs: Any) -> Any:
        """The flavour's RedisTransport(config, channels, **kwargs), not started."""
        raise NotImplementedError

    def make(
        self,
        config: RedisConfig,
        channels: list[str],
        *,
        publish_enabled: bool = True,
        on_attempt_failed: Callable[[AttemptFailure], None] | None = None,
        **options: Any,
    ) -> tuple[Any, Recorder]:
        """A transport with short backoffs, and what it hands up; ``options``
        are TransportOptions fields."""
        recorder = Recorder()
        options.setdefault("min_backoff", 0.05)
        options.setdefault("max_backoff", 0.2)
        transport = self.new(
            config,
            channels,
            on_line=recorder.on_line,
            on_subscribed=recorder.on_subscribed,
            on_connection_lost=recorder.on_connection_lost,
            on_attempt_failed=on_attempt_failed,
            publish_enabled=publish_enabled,
            options=TransportOptions(**options),
        )
        self.made.append(transport)
        return transport, recorder

    def run(self, scenario: Coroutine[Any, Any, None]) -> Any:
        """Run ``scenario`` to its end, or return what pytest-twisted waits for."""
        raise NotImplementedError

    async def _main(self, scenario: Coroutine[Any, Any, None]) -> None:
        try:
            await scenario
        finally:
            for transport in self.made:
                await transport.stop()

    def now(self) -> float:
        raise NotImplementedError

    def sleep(self, seconds: float) -> Awaitable[None]:
        raise NotImplementedError

    def spawn(self, work: Awaitable[Any]) -> Awaitable[Any]:
        """Start ``work`` now (from inside a callback); await it later."""
        raise NotImplementedError

    def timers(self) -> set[Any]:
        """The loop's active timers."""
        raise NotImplementedError

    async def wait_for(
        self, predicate: Callable[[], bool], what: str, timeout: float = 5.0
    ) -> None:
        deadline = self.now() + timeout
        while not predicate():
            if self.now() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await self.sleep(0.01)

    async def started(self, transport: Any) -> None:
        transport.start()
        await self.wait_for(lambda: transport.subscribed, "on_subscribed")


class TwistedHarness(Harness):
    name = "twisted"

    def new(self, config: RedisConfig, channels: Any, **kwargs: Any) -> Any:
        return twisted_transport.RedisTransport(reactor, config, channels, **kwargs)

    def run(self, scenario: Coroutine[Any, Any, None]) -> Any:
        # pytest-twisted runs each test in the reactor and waits for a
        # Deferred that the test returns.
        return defer.ensureDeferred(self._main(scenario))

    def now(self) -> float:
        return float(reactor.seconds())

    def sleep(self, seconds: float) -> Awaitable[None]:
        return deferLater(reactor, seconds)

    def spawn(self, work: Awaitable[Any]) -> Awaitable[Any]:
        if isinstance(work, defer.Deferred):  # publish() and stop() return one
            return work
        return defer.ensureDeferred(cast(Coroutine[Any, Any, Any], work))

    def timers(self) -> set[Any]:
        return {c for c in reactor.getDelayedCalls() if c.active()}


class AsyncioHarness(Harness):
    name = "asyncio"

    def new(self, config: RedisConfig, channels: Any, **kwargs: Any) -> Any:
        return asyncio_transport.RedisTransport(config, channels, **kwargs)

    def run(self, scenario: Coroutine[Any, Any, None]) -> Any:
        # The suite's own loop runs Twisted's reactor in this thread: the
        # scenario gets a loop (and a thread) of its own.
        run_in_new_loop(self._main(scenario))

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def sleep(self, seconds: float) -> Awaitable[None]:
        return asyncio.sleep(seconds)

    def spawn(self, work: Awaitable[Any]) -> Awaitable[Any]:
        return asyncio.ensure_future(work)

    def timers(self) -> set[Any]:
        loop: Any = asyncio.get_running_loop()
        return {h for h in loop._scheduled if not h.cancelled()}


@pytest.fixture(params=[TwistedHarness, AsyncioHarness], ids=lambda h: h.name)
def harness(request: pytest.FixtureRequest) -> Harness:
    """Each transport flavour in turn."""
    flavour: type[Harness] = request.param
    return flavour()


def scenario(
    body: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., Any]:
    """A test whose body is ``async def body(harness, <fixtures>)``, run on
    the harness's own loop; the transports it made are stopped after it."""

    @functools.wraps(body)
    def test(harness: Harness, **fixtures: Any) -> Any:
        return harness.run(body(harness, **fixtures))

    return test


def unique_channel() -> str:
    return f"synrepl-test-{uuid.uuid4().hex}"


def other_clients(control: redis.Redis) -> list[dict[str, Any]]:
    """CLIENT LIST without the control connection itself."""
    me = control.client_id()
    return [c for c in control.client_list() if int(c["id"]) != me]


@pytest.fixture
def shared() -> Any:
    """redis-py on the shared Redis; tests on it use unique channels only."""
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    yield client
    client.close()


@pytest.fixture
def server(tmp_path: Path) -> Any:
    if not redis_server_available():
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path) as s:
        yield s


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel's backlog) and never
    reads or answers: a Redis that hangs, or a TLS handshake that never ends."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])


# --- delivery ------------------------------------------------------------------


@scenario
async def test_messages_arrive_in_order_on_several_channels(
    harness: Harness, shared: redis.Redis
) -> None:
    """Every message on every subscribed channel reaches on_line as text, in
    publication order, with its channel."""
    base = unique_channel()
    channels = [base, f"{base}/USER_IP", f"{base}/other"]
    transport, rec = harness.make(SHARED, channels)
    await harness.started(transport)
    expected = [(channels[i % 3], f'RDATA events master {i} ["é", {i}]') for i in range(90)]
    for channel, line in expected:
        shared.publish(channel, line.encode("utf-8"))
    shared.publish(f"{base}/not-subscribed", "PING 1")
    await harness.wait_for(lambda: len(rec.lines) >= 90, "90 lines")
    await harness.sleep(0.05)
    assert rec.lines == expected
    assert transport.stats.lines_delivered == 90
    assert transport.stats.messages_received == 90
    assert rec.events == ["subscribed"]


@scenario
async def test_on_subscribed_comes_after_the_subscription(
    harness: Harness, shared: redis.Redis
) -> None:
    """Inside on_subscribed, Redis already counts us as a subscriber of every
    channel, and the publisher is ready: what is published from there
    (REPLICATE) is neither lost nor refused."""
    base = unique_channel()
    channels = [base, f"{base}/a", f"{base}/b"]
    transport, rec = harness.make(SHARED, channels)
    receivers: list[int] = []
    published: list[Awaitable[int]] = []

    def hook() -> None:
        assert transport.subscribed
        assert transport.publisher_ready
        for channel in channels:
            receivers.append(shared.publish(channel, f"seen {channel}"))
        published.append(harness.spawn(transport.publish(base, "REPLICATE ")))

    rec.on_subscribed_hook = hook
    transport.start()
    await harness.wait_for(lambda: len(rec.lines) == 4, "4 lines")
    assert receivers == [1, 1, 1]
    assert await published[0] == 1
    assert rec.lines == [*((c, f"seen {c}") for c in channels), (base, "REPLICATE ")]
    assert transport.stats.published == 1


@scenario
async def test_publish_errors_are_clear(harness: Harness) -> None:
    """Before start the publisher is not connected; a newline or an
    unencodable message is refused (Twisted: at the call; asyncio: when
    awaited)."""
    transport, _ = harness.make(SHARED, [unique_channel()])
    with pytest.raises(NotConnectedError, match="not connected"):
        await transport.publish("x", "PING 1")
    with pytest.raises(EncodeError, match="newline"):
        await transport.publish("x", "PING 1\nPING 2")
    with pytest.raises(EncodeError, match="UTF-8"):
        await transport.publish("x", "PING \udc80")
    assert transport.stats.publish_failures == 1


@scenario
async def test_bad_messages_and_handler_errors_do_not_break_the_connection(
    harness: Harness, shared: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Undecodable bytes are counted and skipped, blank messages ignored, an
    exception from on_line logged and counted; the connection stays up and
    later messages flow.  The undecodable warning is rate-limited, and
    message contents never reach the log."""
    caplog.set_level(logging.DEBUG, LOGGER)
    base = unique_channel()
    transport, rec = harness.make(SHARED, [base])

    def explode(channel: str, line: str) -> None:
        if line == "boom":
            raise RuntimeError("handler bug")

    rec.on_line_hook = explode
    await harness.started(transport)
    for i in range(5):
        shared.publish(base, b"\xff\xfe secret-bytes " + bytes([0x80 + i]))
    for message in ("", "   \t ", "boom", "after"):
        shared.publish(base, message)
    await harness.wait_for(lambda: "after" in [line for _, line in rec.lines], "the last line")
    assert [line for _, line in rec.lines] == ["boom", "after"]
    stats = transport.stats
    assert (stats.undecodable_messages, stats.blank_messages, stats.handler_errors) == (5, 2, 1)
    assert (stats.connects, stats.connection_losses, stats.messages_received) == (1, 0, 9)
    assert transport.subscribed
    undecodable = [r for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(undecodable) == 1
    assert "secret-bytes" not in caplog.text
    handler_logs = [r for r in caplog.records if "on_line raised" in r.getMessage()]
    assert len(handler_logs) == 1 and handler_logs[0].exc_info is not None


@scenario
async def test_pause_and_resume_reading(harness: Harness, shared: redis.Redis) -> None:
    """While paused nothing is delivered and keepalive does not mistake the
    silence for a dead connection; on resume everything arrives in order.
    Pausing from inside on_line stops delivery right after that line."""
    base = unique_channel()
    transport, rec = harness.make(SHARED, [base], keepalive_interval=0.05, keepalive_timeout=0.1)
    await harness.started(transport)
    transport.pause_reading()
    for i in range(5):
        shared.publish(base, f"PING {i}")
    await harness.sleep(0.4)  # several keepalive periods
    assert rec.lines == []
    transport.resume_reading()
    await harness.wait_for(lambda: len(rec.lines) == 5, "5 lines")
    assert [line for _, line in rec.lines] == [f"PING {i}" for i in range(5)]

    rec.lines.clear()
    rec.on_line_hook = lambda channel, line: transport.pause_reading()
    pipe = shared.pipeline(transaction=True)
    for i in range(4):
        pipe.publish(base, f"BURST {i}")
    pipe.execute()
    await harness.wait_for(lambda: len(rec.lines) == 1, "the first burst line")
    await harness.sleep(0.2)
    assert [line for _, line in rec.lines] == ["BURST 0"]
    rec.on_line_hook = None
    transport.resume_reading()
    await harness.wait_for(lambda: len(rec.lines) == 4, "the whole burst")
    assert [line for _, line in rec.lines] == [f"BURST {i}" for i in range(4)]
    assert transport.stats.keepalive_timeouts == 0
    assert transport.stats.connection_losses == 0


@scenario
async def test_reading_paused_before_the_connection_holds_everything(
    harness: Harness, shared: redis.Redis
) -> None:
    """pause_reading() before start: the connection is set up, on_subscribed
    is called, and nothing is handed up until resume_reading()."""
    base = unique_channel()
    transport, rec = harness.make(SHARED, [base])
    transport.pause_reading()
    await harness.started(transport)
    for i in range(3):
        shared.publish(base, f"PING {i}")
    await harness.sleep(0.2)
    assert rec.lines == []
    transport.resume_reading()
    await harness.wait_for(lambda: len(rec.lines) == 3, "3 lines")


@scenario
async def test_dbid_is_selected_on_both_connections(harness: Harness, shared: redis.Redis) -> None:
    """SELECT dbid is issued on both connections (CLIENT LIST shows db=3);
    pub/sub is not scoped by database, so a message published from db 0
    still arrives."""
    base = unique_channel()
    name = f"synrepl-test-{uuid.uuid4().hex[:8]}"
    config = RedisConfig(enabled=True, host="127.0.0.1", port=6379, dbid=3)
    transport, rec = harness.make(config, [base], client_name=name)
    await harness.started(transport)
    ours = {c["name"]: c for c in shared.client_list() if c["name"].startswith(name)}
    assert sorted(ours) == [f"{name}-pub", f"{name}-sub"]
    assert {c["db"] for c in ours.values()} == {"3"}
    assert ours[f"{name}-sub"]["sub"] == "1"
    shared.publish(base, "PING 1")
    await harness.wait_for(lambda: rec.lines == [(base, "PING 1")], "the line")


@pytest.mark.skipif(not HIREDIS, reason="hiredis is not installed")
@scenario
async def test_hiredis_parses_replies(harness: Harness) -> None:
    transport, _ = harness.make(SHARED, ["x"])
    assert transport.parser == "hiredis"


# --- reconnecting (own redis-server) ---------------------------------------------


@needs_redis_server
@scenario
async def test_reconnects_after_redis_restart(
    harness: Harness, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis dies and comes back: on_connection_lost once, on_subscribed
    again, both connections work again.  Through all the failed attempts in
    between, the loss and the recovery are each logged once."""
    caplog.set_level(logging.DEBUG, LOGGER)
    transport, rec = harness.make(server.redis_config(), ["hs"])
    await harness.started(transport)
    server.kill()
    await harness.wait_for(lambda: rec.events == ["subscribed", "lost"], "on_connection_lost")
    await harness.wait_for(lambda: transport.stats.failed_attempts >= 6, "failed attempts")
    assert not transport.subscribed
    with pytest.raises(NotConnectedError):
        await transport.publish("hs", "PING 0")
    server.start()
    await harness.wait_for(lambda: transport.subscribed, "re-subscription")
    assert rec.events == ["subscribed", "lost", "subscribed"]
    assert await transport.publish("hs", "PING 1") == 1
    server.client().publish("hs", "PING 2")
    await harness.wait_for(lambda: len(rec.lines) == 2, "two lines")
    assert rec.lines == [("hs", "PING 1"), ("hs", "PING 2")]
    stats = transport.stats
    assert (stats.connects, stats.reconnects, stats.connection_losses) == (2, 1, 1)
    assert (stats.publisher_connects, stats.publisher_losses) == (2, 1)

    def logged(role: str, level: int, text: str) -> int:
        return sum(
            1
            for r in caplog.records
            if r.levelno == level and f"Redis {role}:" in r.getMessage() and text in r.getMessage()
        )

    for role in ("subscriber", "publisher"):
        assert logged(role, logging.WARNING, "lost") == 1
        assert logged(role, logging.INFO, "reconnected") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "cannot" in r.msg]


@needs_redis_server
@scenario
async def test_reconnects_after_client_kill(harness: Harness, server: RedisServer) -> None:
    """CLIENT KILL TYPE pubsub drops the subscriber only; it comes back and
    messages flow; the publisher is untouched."""
    transport, rec = harness.make(server.redis_config(), ["hs", "hs/x"])
    await harness.started(transport)
    control = server.client()
    assert control.client_kill_filter(_type="pubsub") == 1
    await harness.wait_for(
        lambda: rec.events == ["subscribed", "lost", "subscribed"], "loss and re-subscription"
    )
    control.publish("hs/x", "PING 1")
    await harness.wait_for(lambda: rec.lines == [("hs/x", "PING 1")], "the line")
    assert transport.stats.publisher_losses == 0
    assert transport.stats.reconnects == 1


@needs_redis_server
@scenario
async def test_callback_errors_do_not_end_the_connection(
    harness: Harness, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """on_subscribed and on_connection_lost raising are logged and counted;
    the connection stays, and a loss is still followed by a reconnection."""
    transport, rec = harness.make(server.redis_config(), ["hs"])

    def explode() -> None:
        raise RuntimeError("callback bug")

    rec.on_subscribed_hook = rec.on_lost_hook = explode
    await harness.started(transport)
    assert transport.stats.handler_errors == 1
    server.client().client_kill_filter(_type="pubsub")
    await harness.wait_for(lambda: len(rec.events) == 3, "loss and re-subscription")
    assert rec.events == ["subscribed", "lost", "subscribed"]
    assert transport.stats.handler_errors == 3
    server.client().publish("hs", "PING 1")
    await harness.wait_for(lambda: rec.lines == [("hs", "PING 1")], "the line")
    assert "on_connection_lost raised" in caplog.text


@needs_redis_server
@scenario
async def test_keepalive_notices_a_paused_redis(harness: Harness, server: RedisServer) -> None:
    """CLIENT PAUSE past the keepalive timeout leaves PINGs unanswered: the
    connection is aborted and re-made, and works once Redis resumes."""
    transport, rec = harness.make(
        server.redis_config(), ["hs"], keepalive_interval=0.1, keepalive_timeout=0.3
    )
    await harness.started(transport)
    control = server.client()
    control.execute_command("CLIENT", "PAUSE", "1500", "ALL")
    await harness.wait_for(lambda: rec.events[-1:] == ["lost"], "the loss", timeout=1.4)
    assert transport.stats.keepalive_timeouts >= 1
    await harness.wait_for(lambda: transport.subscribed, "re-subscription", timeout=5)
    assert rec.events == ["subscribed", "lost", "subscribed"]
    control.publish("hs", "PING 1")
    await harness.wait_for(lambda: rec.lines == [("hs", "PING 1")], "the line")


@needs_redis_server
@scenario
async def test_auth_failure_keeps_retrying_until_the_password_works(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused AUTH does not stop the loop (Synapse #9351): once Redis
    accepts the password, the transport connects.  No password is logged."""
    caplog.set_level(logging.DEBUG, LOGGER)
    with RedisServer(tmp_path, password="right-horse-battery") as server:
        config = server.redis_config(password="wrong-horse-battery")
        transport, rec = harness.make(config, ["hs"])
        transport.start()
        await harness.wait_for(lambda: transport.stats.failed_attempts >= 6, "refusals")
        assert rec.events == []
        server.client().config_set("requirepass", "wrong-horse-battery")
        await harness.wait_for(lambda: transport.subscribed, "the subscription")
        assert rec.events == ["subscribed"]
        assert "AUTH failed" in caplog.text
        assert "horse-battery" not in caplog.text
        assert "horse-battery" not in repr(transport)
        await transport.stop()


@needs_redis_server
@scenario
async def test_acl_username(harness: Harness, server: RedisServer) -> None:
    """With a username, AUTH <username> <password> is sent (Redis 6 ACLs)."""
    control = server.client()
    control.execute_command("ACL", "SETUSER", "synrepl", "on", ">s3cret-pw", "~*", "&*", "+@all")
    config = server.redis_config(username="synrepl", password="s3cret-pw")
    transport, _ = harness.make(config, ["hs"])
    await harness.started(transport)
    assert sorted(c["user"] for c in other_clients(control)) == ["synrepl", "synrepl"]


@needs_redis_server
@scenario
async def test_a_refused_subscribe_fails_the_attempt(harness: Harness, server: RedisServer) -> None:
    """An ACL that does not allow one of the channels refuses SUBSCRIBE:
    the attempt fails at once with Redis's reason (not after a timeout), and
    the loop goes on until the ACL allows it."""
    control = server.client()
    control.execute_command(
        "ACL", "SETUSER", "narrow", "on", ">pw", "~*", "resetchannels", "&hs", "+@all"
    )
    failures: list[AttemptFailure] = []
    config = server.redis_config(username="narrow", password="pw")
    transport, rec = harness.make(
        config, ["hs", "hs/USER_IP"], on_attempt_failed=failures.append, connect_timeout=5.0
    )
    transport.start()
    await harness.wait_for(lambda: len(failures) >= 3, "refusals", timeout=2.0)
    assert {f.role for f in failures} == {"subscriber"}
    assert failures[0].reason.startswith("SUBSCRIBE failed: NOPERM")
    control.execute_command("ACL", "SETUSER", "narrow", "&hs/USER_IP")
    await harness.wait_for(lambda: transport.subscribed, "the subscription")
    assert rec.events == ["subscribed"]


@needs_redis_server
@scenario
async def test_select_failure_keeps_retrying(
    harness: Harness, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused SELECT (no such database) fails the attempt, not the loop.
    The failure is logged once, then "still cannot connect" at most every
    down_log_interval, not once per attempt."""
    caplog.set_level(logging.WARNING, LOGGER)
    transport, rec = harness.make(
        server.redis_config(dbid=99), ["hs"], publish_enabled=False, down_log_interval=0.5
    )
    start = harness.now()
    transport.start()
    await harness.sleep(1.2)
    elapsed = harness.now() - start
    attempts = transport.stats.failed_attempts
    assert attempts >= 8
    assert rec.events == []
    first = [r for r in caplog.records if r.getMessage().startswith("Redis subscriber: cannot")]
    still = [r for r in caplog.records if "still cannot connect" in r.getMessage()]
    assert len(first) == 1 and "SELECT 99 failed" in first[0].getMessage()
    assert 1 <= len(still) <= elapsed / 0.5 + 1
    assert len(first) + len(still) < attempts
    await harness.wait_for(lambda: transport.stats.failed_attempts > attempts + 1, "more attempts")


@needs_redis_server
@scenario
async def test_unix_socket(harness: Harness, tmp_path: Path) -> None:
    """``path`` connects over the unix socket (the server has no TCP port)."""
    with RedisServer(tmp_path, unix_socket=True) as server:
        transport, rec = harness.make(server.redis_config(), ["hs"])
        await harness.started(transport)
        assert transport.address.startswith("unix:")
        assert await transport.publish("hs", "PING 1") == 1
        server.client().publish("hs", "PING 2")
        await harness.wait_for(lambda: len(rec.lines) == 2, "two lines")
        assert rec.lines == [("hs", "PING 1"), ("hs", "PING 2")]
        await transport.stop()


@needs_redis_server
@scenario
async def test_publish_disabled_opens_one_connection(harness: Harness, server: RedisServer) -> None:
    """publish_enabled=False: only the subscriber connects, on_subscribed
    does not wait for a publisher, and publish() raises."""
    transport, _ = harness.make(server.redis_config(), ["hs"], publish_enabled=False)
    await harness.started(transport)
    await harness.sleep(0.2)
    clients = other_clients(server.client())
    assert len(clients) == 1
    assert clients[0]["sub"] == "1"
    assert not transport.publisher_ready
    with pytest.raises(PublishDisabledError):
        await transport.publish("hs", "PING 1")


@needs_redis_server
@scenario
async def test_stop_closes_both_and_stops_reconnecting(
    harness: Harness, server: RedisServer
) -> None:
    """stop() closes both connections (on_connection_lost is still called),
    leaves no timer behind and never reconnects; a second transport stopped
    while Redis is down stops retrying."""
    baseline = harness.timers()
    transport, rec = harness.make(server.redis_config(), ["hs"], keepalive_interval=0.05)
    await harness.started(transport)
    control = server.client()
    assert len(other_clients(control)) == 2
    await transport.stop()
    assert rec.events == ["subscribed", "lost"]
    await harness.wait_for(lambda: not other_clients(control), "the connections to close")
    await harness.sleep(0.3)
    assert other_clients(control) == []
    assert harness.timers() - baseline == set()
    with pytest.raises(NotConnectedError, match="stopped"):
        await transport.publish("hs", "PING 1")
    with pytest.raises(RuntimeError):
        transport.start()
    await transport.stop()  # again: nothing more happens
    assert rec.events == ["subscribed", "lost"]

    server.kill()
    down, _ = harness.make(server.redis_config(), ["hs"])
    down.start()
    await harness.wait_for(lambda: down.stats.failed_attempts >= 2, "failed attempts")
    await down.stop()
    attempts = down.stats.failed_attempts
    await harness.sleep(0.5)
    assert down.stats.failed_attempts == attempts


@scenario
async def test_stop_while_connecting(harness: Harness, silent_port: int) -> None:
    """stop() during a set-up that Redis never answers (plain TCP), or during
    a TLS handshake that never ends, returns within connect_timeout, calls no
    callback, and no attempt follows."""
    failures: list[AttemptFailure] = []
    for use_tls in (False, True):
        config = RedisConfig(enabled=True, host="127.0.0.1", port=silent_port, use_tls=use_tls)
        transport, rec = harness.make(
            config, ["hs"], on_attempt_failed=failures.append, connect_timeout=0.5, tls_verify=False
        )
        transport.start()
        await harness.sleep(0.1)
        before = harness.now()
        await transport.stop()
        assert harness.now() - before < 0.5 + 0.3
        await harness.sleep(0.7)
        assert rec.events == [] and failures == []
        assert not transport.subscribed and not transport.publisher_ready


@scenario
async def test_a_silent_redis_times_the_attempt_out(harness: Harness, silent_port: int) -> None:
    """A server that accepts the connection but never answers fails each
    attempt after connect_timeout, saying so."""
    failures: list[AttemptFailure] = []
    config = RedisConfig(enabled=True, host="127.0.0.1", port=silent_port)
    transport, rec = harness.make(
        config,
        ["hs"],
        publish_enabled=False,
        on_attempt_failed=failures.append,
        connect_timeout=0.2,
    )
    transport.start()
    await harness.wait_for(lambda: len(failures) >= 2, "timeouts", timeout=3.0)
    assert failures[0].reason == "no answer to AUTH/SELECT/SUBSCRIBE within 0.2 s"
    assert rec.events == []


@scenario
async def test_failed_attempts_are_reported_with_their_reason(harness: Harness) -> None:
    """Nothing listens: each failed attempt of either link reaches
    on_attempt_failed with its role, a reason and a running count, and
    last_failure keeps the latest; an exception from the callback is counted
    and does not stop the retries."""
    failures: list[AttemptFailure] = []

    def record(failure: AttemptFailure) -> None:
        failures.append(failure)
        raise RuntimeError("callback bug")

    config = RedisConfig(enabled=True, host="127.0.0.1", port=free_port())
    transport, rec = harness.make(config, ["hs"], on_attempt_failed=record)
    assert transport.last_failure is None
    transport.start()
    await harness.wait_for(lambda: len(failures) >= 6, "several failed attempts")
    assert {f.role for f in failures} == {"subscriber", "publisher"}
    assert all("refused" in f.reason.lower() for f in failures)
    subscriber = [f.failures for f in failures if f.role == "subscriber"]
    assert subscriber == list(range(1, len(subscriber) + 1))
    assert transport.last_failure == failures[-1]
    assert transport.stats.handler_errors == len(failures)
    assert transport.stats.failed_attempts == len(failures)
    assert rec.events == []


@needs_redis_server
@scenario
async def test_a_refused_auth_is_reported_without_the_password(
    harness: Harness, tmp_path: Path
) -> None:
    """The reason given to on_attempt_failed names the refused AUTH, never
    the password."""
    failures: list[AttemptFailure] = []
    with RedisServer(tmp_path, password="right-horse-battery") as server:
        config = server.redis_config(password="wrong-horse-battery")
        transport, _ = harness.make(config, ["hs"], on_attempt_failed=failures.append)
        transport.start()
        await harness.wait_for(lambda: len(failures) >= 2, "refusals")
        await transport.stop()
    assert all(f.reason.startswith("AUTH failed") for f in failures)
    assert not [f for f in failures if "horse-battery" in repr(f)]


@needs_redis_server
@scenario
async def test_client_setname_refused_is_only_a_warning(
    harness: Harness, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL that forbids CLIENT SETNAME earns one warning; both connections
    are set up anyway."""
    caplog.set_level(logging.WARNING, LOGGER)
    control = server.client()
    control.execute_command(
        "ACL", "SETUSER", "noname", "on", ">pw", "~*", "&*", "+@all", "-client|setname"
    )
    config = server.redis_config(username="noname", password="pw")
    transport, _ = harness.make(config, ["hs"], client_name="synrepl-test")
    await harness.started(transport)
    assert await transport.publish("hs", "PING 1") == 1
    assert {c["name"] for c in other_clients(control)} == {""}
    refused = [r for r in caplog.records if "refused CLIENT SETNAME" in r.getMessage()]
    assert len(refused) == 1
    assert transport.stats.failed_attempts == 0


# --- TLS ---------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if server:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(path: Path, key: Any = None, cert: Any = None) -> Path:
    data = b""
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFiles, Path]:
    """A CA, a server cert for localhost/127.0.0.1, a client cert; plus a foreign CA."""
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca = _make_ca("synrepl test CA")
    server_key, server_cert = _issue(ca_key, ca, "localhost", server=True)
    client_key, client_cert = _issue(ca_key, ca, "synrepl client", server=False)
    _, foreign = _make_ca("some other CA")
    files = TlsFiles(
        ca_file=_write(d / "ca.pem", cert=ca),
        server_cert=_write(d / "server.pem", cert=server_cert),
        server_key=_write(d / "server.key", key=server_key),
        client_cert=_write(d / "client.pem", cert=client_cert),
        client_key=_write(d / "client.key", key=client_key),
    )
    return files, _write(d / "foreign-ca.pem", cert=foreign)


#: Twisted hands pyOpenSSL objects to pyOpenSSL, which now warns about it.
twisted_tls_warnings = pytest.mark.filterwarnings(
    "ignore:Passing pyOpenSSL .* objects is deprecated:DeprecationWarning"
)


@pytest.fixture
def tls_server(tmp_path: Path, tls_files: tuple[TlsFiles, Path]) -> Any:
    if not redis_server_available():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path, tls=tls_files[0])
    try:
        server.start()
    except RuntimeError as e:
        if "TLS" in str(e) or "tls" in str(e):
            pytest.skip(f"this redis-server has no TLS support: {str(e)[-200:]}")
        raise
    yield server
    server.close()


@twisted_tls_warnings
@scenario
async def test_tls_with_client_certificate(harness: Harness, tls_server: RedisServer) -> None:
    """TLS to a server that requires a client certificate, verified against
    ca_file for the name "localhost"; both connections work."""
    transport, rec = harness.make(tls_server.redis_config(host="localhost"), ["hs"])
    await harness.started(transport)
    assert transport.address.endswith("(TLS)")
    assert await transport.publish("hs", "PING 1") == 1
    tls_server.client().publish("hs", "PING 2")
    await harness.wait_for(lambda: len(rec.lines) == 2, "two lines")
    assert rec.lines == [("hs", "PING 1"), ("hs", "PING 2")]


@twisted_tls_warnings
@scenario
async def test_tls_ca_path(harness: Harness, tls_server: RedisServer, tmp_path: Path) -> None:
    """ca_path (a directory of CA certificates, not hashed names) is trusted
    as well, and a server certificate for 127.0.0.1 is checked against the IP."""
    ca_dir = tmp_path / "cas"
    ca_dir.mkdir()
    assert tls_server.tls is not None
    shutil.copy(tls_server.tls.ca_file, ca_dir / "ca.pem")
    (ca_dir / "README").write_text("not a certificate")
    config = tls_server.redis_config(host="127.0.0.1", ca_file=None, ca_path=str(ca_dir))
    transport, _ = harness.make(config, ["hs"])
    await harness.started(transport)


@twisted_tls_warnings
@scenario
async def test_tls_refuses_an_untrusted_server_and_keeps_trying(
    harness: Harness,
    tls_server: RedisServer,
    tls_files: tuple[TlsFiles, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server certificate from another CA fails verification; the loop goes
    on.  tls_verify=False (Synapse's own behaviour) connects anyway."""
    caplog.set_level(logging.WARNING, LOGGER)
    config = tls_server.redis_config(host="localhost", ca_file=str(tls_files[1]))
    transport, rec = harness.make(config, ["hs"])
    transport.start()
    await harness.wait_for(lambda: transport.stats.failed_attempts >= 4, "several refusals")
    assert rec.events == []
    assert "certificate verify failed" in caplog.text

    unverified, _ = harness.make(tls_server.redis_config(ca_file=None), ["hs"], tls_verify=False)
    await harness.started(unverified)


# --- arguments -------------------------------------------------------------------


@scenario
async def test_bad_arguments_are_refused_at_once(harness: Harness, tmp_path: Path) -> None:
    def build(config: RedisConfig = SHARED, channels: Any = ("x",), **options: Any) -> Any:
        return harness.new(
            config,
            channels,
            on_line=lambda c, m: None,
            on_subscribed=lambda: None,
            on_connection_lost=lambda: None,
            options=TransportOptions(**options),
        )

    with pytest.raises(TypeError):
        build(channels="hs")
    with pytest.raises(ValueError, match="channels"):
        build(channels=[])
    with pytest.raises(ValueError, match="max_backoff"):
        build(min_backoff=2.0, max_backoff=1.0)
    with pytest.raises(ValueError, match="keepalive_timeout"):
        build(keepalive_timeout=0)
    with pytest.raises(ValueError, match="client_name"):
        build(client_name="two words")
    missing = RedisConfig(enabled=True, use_tls=True, ca_file=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match=r"nope\.pem") as info:
        build(missing)
    assert info.value.path == ("redis", "ca_file")
    key_only = RedisConfig(enabled=True, use_tls=True, private_key_file=str(tmp_path / "k"))
    with pytest.raises(ConfigError, match="needs certificate_file"):
        build(key_only)
    transport = build(channels=["a", "b", "a"])
    assert transport.channels == ("a", "b")
    transport.start()
    with pytest.raises(RuntimeError, match="already"):
        transport.start()
    await transport.stop()


# --- Twisted only: the pure-Python reply reader with txredisapi's errors ---------------


def _resp_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.binary(max_size=40).map(lambda b: ("bulk", b)),
        st.integers(-(2**63), 2**63 - 1).map(lambda i: ("int", i)),
        st.just(("nil", None)),
        st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20).map(
            lambda t: ("status", t)
        ),
        st.text(
            st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1, max_size=20
        ).map(lambda t: ("error", t)),
    )
    return st.recursive(
        leaves, lambda inner: st.lists(inner, max_size=4).map(lambda v: ("array", v))
    )


def _encode_resp(value: tuple[str, Any]) -> bytes:
    kind, v = value
    if kind == "bulk":
        return b"$%d\r\n%s\r\n" % (len(v), v)
    if kind == "int":
        return b":%d\r\n" % v
    if kind == "nil":
        return b"$-1\r\n"
    if kind == "status":
        return b"+" + v.encode() + b"\r\n"
    if kind == "error":
        return b"-" + v.encode() + b"\r\n"
    return b"*%d\r\n" % len(v) + b"".join(_encode_resp(x) for x in v)


def _comparable(reply: Any) -> Any:
    if isinstance(reply, Exception):
        return ("error", type(reply).__name__, str(reply))
    if isinstance(reply, list):
        return [_comparable(x) for x in reply]
    return reply


def _read_all(reader: Any, chunks: list[bytes]) -> list[Any]:
    replies = []
    for chunk in chunks:
        reader.feed(chunk)
        while (reply := reader.gets()) is not False:
            replies.append(_comparable(reply))
    return replies


@pytest.mark.skipif(not HIREDIS, reason="compares with hiredis")
@settings(max_examples=200, deadline=None)
@given(values=st.lists(_resp_values(), min_size=1, max_size=6), data=st.data())
def test_python_reader_matches_hiredis(values: list[Any], data: st.DataObject) -> None:
    """The reader used without hiredis returns what hiredis returns, however
    the bytes are split into chunks."""
    import hiredis
    import txredisapi

    wire = b"".join(_encode_resp(v) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    expected = _read_all(hiredis.Reader(replyError=txredisapi.ResponseError), [wire])
    assert _read_all(_PythonReader(), chunks) == expected
    assert len(expected) == len(values)
