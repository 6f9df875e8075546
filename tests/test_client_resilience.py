"""ReplicationClient when Redis fails under it: restart, killed subscriber, pause.

Each test runs its own redis-server (tests/redis_server.py), since it
disturbs every client of that Redis, and asserts that every row the writer
persisted arrives exactly once and in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from client_helpers import (
    Adapter,
    Collector,
    client_for,
    event,
    homeserver,
    sleep,
    unique_server_name,
    wait_until,
)
from redis_server import RedisServer, redis_server_available
from twisted.internet import reactor

from synrepl.connection import TransportOptions
from synrepl.streams import TypingRow
from synrepl.testing.clock import VirtualTime
from synrepl.testing.homeserver import FakeHomeserver

pytestmark = pytest.mark.skipif(not redis_server_available(), reason="no redis-server binary")

FAST = TransportOptions(keepalive_interval=0.3, keepalive_timeout=0.3, max_backoff=0.3)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as srv:
        yield srv


async def cluster(
    server: RedisServer, adapter: Adapter, **hs_kwargs: Any
) -> tuple[FakeHomeserver, Any, Collector]:
    hs = FakeHomeserver(
        reactor,
        server_name=unique_server_name(),
        redis_port=server.port,
        transport_options=FAST,
        **hs_kwargs,
    )
    await hs.start()
    hs.write("events", [event(0)])
    client = adapter.client(hs, transport_options=FAST)
    seen = Collector()
    client.on_rows("events", seen)
    await client.start()
    await wait_until(lambda: "events" in client.positions(), what="first POSITION")
    return hs, client, seen


async def write_while(hs: FakeHomeserver, count: int, disturb_at: int, disturb: Any) -> None:
    """Write ``count`` events a few ms apart, calling ``disturb()`` part-way."""
    for n in range(1, count + 1):
        hs.write("events", [event(n), event(10_000 + n)] if n % 7 == 0 else [event(n)])
        if n == disturb_at:
            disturb()
        await sleep(0.005)


async def settle(hs: FakeHomeserver, client: Any, start: int, seen: Collector) -> None:
    """After the disturbance: a final POSITION round, then every row must be in."""
    target = hs.token("events")
    for _ in range(100):
        hs.position("events")  # what a writer's next POSITION would reveal
        if client.positions()["events"]["master"] == target:
            break
        await sleep(0.1)
    await wait_until(lambda: client.positions()["events"]["master"] == target, what="catch-up")
    expected = [(t, r) for t, r in hs.history("events") if t > start]
    assert seen.rows("events", "master") == expected


async def shutdown(hs: FakeHomeserver, client: Any) -> None:
    await client.stop()
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_redis_restarted_mid_stream(server: RedisServer, adapter: Adapter) -> None:
    """Redis killed and restarted while the writer writes: the client
    reconnects, re-REPLICATEs and fetches what was lost; no row lost or repeated."""
    hs, client, seen = await cluster(server, adapter)
    start = client.positions()["events"]["master"]
    await write_while(hs, 150, 50, server.kill)
    server.start()
    await wait_until(lambda: client.counters.reconnects >= 1, timeout=20, what="reconnect")
    await write_while(hs, 30, 0, lambda: None)
    await settle(hs, client, start, seen)
    assert hs.publish_failures > 0  # rows really were lost on the wire
    await shutdown(hs, client)


def test_redis_down_for_a_minute_on_virtual_time() -> None:
    """The same with Redis in memory, on virtual time: down for 60 s while
    the writer goes on, which a real-time test could not afford to wait;
    every row still arrives exactly once, and the run is the same each time."""
    virtual = VirtualTime()

    async def body() -> None:
        hs = await homeserver(transport_options=FAST)
        hs.write("events", [event(0)])
        client = client_for(hs, transport_options=FAST)
        seen = Collector()
        client.on_rows("events", seen)
        await client.start()
        await wait_until(lambda: "events" in client.positions(), what="first POSITION")
        start = client.positions()["events"]["master"]
        await write_while(hs, 150, 50, virtual.redis.kill)
        await sleep(60)
        assert client.counters.reconnects == 0
        virtual.redis.start()
        await wait_until(lambda: client.counters.reconnects >= 1, what="reconnect")
        await write_while(hs, 30, 0, lambda: None)
        await settle(hs, client, start, seen)
        assert hs.publish_failures >= 100  # rows 51..150 never reached the wire
        await shutdown(hs, client)

    virtual.run(body())


@pytest_twisted.ensureDeferred
async def test_subscriber_killed_with_client_kill(server: RedisServer, adapter: Adapter) -> None:
    """CLIENT KILL TYPE pubsub cuts every subscriber: the client reconnects
    and still delivers every row exactly once."""
    hs, client, seen = await cluster(server, adapter)
    start = client.positions()["events"]["master"]
    admin = server.client()
    await write_while(hs, 100, 40, lambda: admin.client_kill_filter(_type="pubsub"))
    await wait_until(lambda: client.counters.reconnects >= 1, timeout=20, what="reconnect")
    await settle(hs, client, start, seen)
    await shutdown(hs, client)


@pytest_twisted.ensureDeferred
async def test_redis_paused_past_the_keepalive(server: RedisServer, adapter: Adapter) -> None:
    """CLIENT PAUSE longer than the keepalive: the dead-looking connection is
    dropped and re-made, and no row is lost or repeated."""
    hs, client, seen = await cluster(server, adapter)
    start = client.positions()["events"]["master"]
    admin = server.client()
    await write_while(hs, 60, 20, lambda: admin.execute_command("CLIENT", "PAUSE", "1500", "ALL"))
    await wait_until(lambda: client.counters.reconnects >= 1, timeout=20, what="reconnect")
    await settle(hs, client, start, seen)
    await shutdown(hs, client)


@pytest_twisted.ensureDeferred
async def test_read_only_client_issues_no_publish_at_all(
    server: RedisServer, adapter: Adapter
) -> None:
    """Redis's own command log (MONITOR-like INFO commandstats) shows that a
    read-only client never ran PUBLISH and never opened a second connection."""
    hs = FakeHomeserver(reactor, server_name=unique_server_name(), redis_port=server.port)
    await hs.start()
    hs.write("typing", [TypingRow("!r", ())])
    await sleep(0.2)  # let the homeserver's own publishes land before counting
    admin = server.client()
    admin.config_resetstat()
    clients_before = len(admin.client_list())
    publishes_before = admin.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)
    client = adapter.client(hs, read_only=True)
    seen = Collector()
    client.on_rows("typing", seen)
    await client.start()
    await sleep(0.3)  # time for a REPLICATE, were one sent
    assert len(admin.client_list()) == clients_before + 1  # the subscriber only
    publishes_mid = admin.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)
    assert publishes_mid == publishes_before  # no REPLICATE
    hs.position("typing")
    hs.write("typing", [TypingRow("!r2", ("@a",))])
    await wait_until(lambda: len(seen.batches) == 1)
    publishes_after = admin.info("commandstats").get("cmdstat_publish", {}).get("calls", 0)
    assert publishes_after == publishes_mid + 2  # the homeserver's POSITION and RDATA only
    await client.stop()
    await hs.stop()
