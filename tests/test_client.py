"""ReplicationClient against real Redis and the simulated homeserver.

Every scenario asserts that each row arrives exactly once and in order: the
rows a handler saw, per stream and writer, equal the writer's history past
the client's start position.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import pytest_twisted
from client_helpers import (
    Adapter,
    ChannelTap,
    Collector,
    client_for,
    event,
    homeserver,
    scenario,
    sleep,
    wait_until,
)
from twisted.internet import reactor

from synrepl.commands import LockReleasedCommand
from synrepl.positions import GapUnfillable, RowsReceived
from synrepl.streams import ReceiptsRow, ToDeviceRow, TypingRow
from synrepl.testing.homeserver import FakeHomeserver
from synrepl.twisted.client import ReadOnlyError, ReplicationClient
from synrepl.twisted.http_client import ReplicationHttpClient


async def connected(client: Any, hs: FakeHomeserver, streams: list[str]) -> None:
    """Start the client and wait until every writer's streams are connected."""
    await client.start()
    await wait_until(
        lambda: all(
            s in client.positions() and set(client.positions()[s]) >= set(hs_writers(hs, s))
            for s in streams
        ),
        what="POSITIONs answering REPLICATE",
    )


def hs_writers(hs: FakeHomeserver, stream: str) -> list[str]:
    return [w for w in hs.config().instance_map if hs.history(stream, writer=w)]


def expected(hs: FakeHomeserver, stream: str, writer: str, after: int) -> list[tuple[int, Any]]:
    return [(t, r) for t, r in hs.history(stream, writer=writer) if t > after]


@scenario
async def test_steady_stream_across_streams_and_writers(adapter: Adapter) -> None:
    """Thousands of rows on three streams from two writers (batches included)
    arrive exactly once, in order, with the right writer names."""
    hs = await homeserver(writers=("master", "persister1"))
    for stream, row in (
        ("events", event(0)),
        ("typing", TypingRow("!r", ())),
        ("to_device", ToDeviceRow("@a")),
    ):
        hs.write(stream, [row], writer="master")
    hs.write("events", [event(0)], writer="persister1")
    client = adapter.client(hs)
    seen = Collector()
    client.on_rows(None, seen)
    await connected(client, hs, ["events", "typing", "to_device"])
    start = client.positions()
    for n in range(1, 1001):
        writer = "master" if n % 2 else "persister1"
        hs.write("events", [event(n), event(-n)] if n % 10 == 0 else [event(n)], writer=writer)
        if n % 3 == 0:
            hs.write("typing", [TypingRow(f"!r{n}", (f"@u{n}",))])
        if n % 5 == 0:
            hs.write("to_device", [ToDeviceRow(f"@u{n}"), ToDeviceRow(f"@v{n}")])
    final = {
        ("events", "master"),
        ("events", "persister1"),
        ("typing", "master"),
        ("to_device", "master"),
    }
    await wait_until(
        lambda: all(
            client.positions()[s].get(w) == hs.history(s, writer=w)[-1][0] for s, w in final
        ),
        what="every row",
    )
    for stream, writer in final:
        assert seen.rows(stream, writer) == expected(hs, stream, writer, start[stream][writer])
    assert sum(len(b.rows) for b in seen.batches) == 1100 + 333 + 400
    assert all(not b.fetched for b in seen.batches)
    await client.stop()
    await hs.stop()


@scenario
async def test_dropped_rdata_is_fetched_when_a_position_reveals_it(adapter: Adapter) -> None:
    """RDATA lost on the wire is noticed at the writer's next POSITION and
    fetched over HTTP from that writer, in order, before later rows."""
    hs = await homeserver()
    hs.write("receipts", [ReceiptsRow("!r", "m.read", "@a", "$e0", None, {"ts": 0})])
    client = adapter.client(hs)
    seen = Collector()
    client.on_rows("receipts", seen)
    await connected(client, hs, ["receipts"])
    start = client.positions()["receipts"]["master"]
    hs.write("receipts", [ReceiptsRow("!r", "m.read", "@a", "$e1", None, {"ts": 1})])
    hs.write_silently("receipts", [ReceiptsRow("!r", "m.read", "@b", "$e2", None, {"ts": 2})])
    hs.write_silently("receipts", [ReceiptsRow("!r", "m.read", "@c", "$e3", None, {"ts": 3})])
    hs.write("receipts", [ReceiptsRow("!r", "m.read", "@d", "$e4", None, {"ts": 4})])
    await wait_until(lambda: len(seen.batches) == 2, what="the live rows")
    assert [b.token for b in seen.batches] == [start + 1, start + 4]  # 2 and 3 missing...
    hs.position("receipts")  # ...until this POSITION says nothing was written since 4
    # Nothing yet: the writer's POSITION prev (4) matches our token, no gap visible.
    hs.write_silently("receipts", [ReceiptsRow("!r", "m.read", "@e", "$e5", None, {"ts": 5})])
    hs.position("receipts")
    await wait_until(lambda: client.positions()["receipts"]["master"] == start + 5, what="fetch")
    assert [(b.token, b.fetched) for b in seen.batches][-1] == (start + 5, True)
    assert client.counters.fetch_pages >= 1
    await client.stop()
    await hs.stop()


@scenario
async def test_restart_from_saved_positions_catches_up_over_http(adapter: Adapter) -> None:
    """A client restarted from its position map gets exactly the rows written
    while it was away (over HTTP, in pages), then live rows, no duplicates."""
    hs = await homeserver(page_limit=7)
    hs.write("events", [event(0)])
    first = adapter.client(hs)
    seen_first = Collector()
    first.on_rows("events", seen_first)
    await connected(first, hs, ["events"])
    for n in range(1, 11):
        hs.write("events", [event(n)])
    await wait_until(lambda: len(seen_first.batches) == 10)
    saved = first.positions()
    await first.stop()
    for n in range(11, 60):  # written while no client listens
        hs.write("events", [event(n), event(1000 + n)] if n % 4 == 0 else [event(n)])
    second = adapter.client(hs, start=saved)
    seen = Collector()
    second.on_rows("events", seen)
    await second.start()
    await wait_until(lambda: second.positions()["events"]["master"] == hs.token("events"))
    hs.write("events", [event(60)])
    await wait_until(lambda: second.positions()["events"]["master"] == hs.token("events"))
    assert seen.rows("events", "master") == expected(
        hs, "events", "master", saved["events"]["master"]
    )
    assert [b.fetched for b in seen.batches].count(False) == 1  # only the last one was live
    assert second.counters.fetch_pages > 5  # 49 tokens in pages of 7 rows
    await second.stop()
    await hs.stop()


@scenario
async def test_garbage_and_unknown_commands_are_skipped(adapter: Adapter) -> None:
    """Garbage lines and unknown commands on the channel are counted and
    skipped; rows around them still arrive exactly once."""
    hs = await homeserver()
    hs.write("typing", [TypingRow("!r", ())])
    client = adapter.client(hs)
    seen = Collector()
    client.on_rows("typing", seen)
    await connected(client, hs, ["typing"])
    start = client.positions()["typing"]["master"]
    for n in range(1, 6):
        hs.write("typing", [TypingRow(f"!r{n}", ())])
        await hs.publish_raw(f"FUTURE_COMMAND {n} with arguments")
        await hs.publish_raw("RDATA typing master 99999 [not json")
        await hs.publish_raw("")
        await hs.publish_raw("\xff\x00 garbage")
    await wait_until(lambda: client.positions()["typing"]["master"] == start + 5)
    assert seen.rows("typing", "master") == expected(hs, "typing", "master", start)
    assert client.counters.unknown_commands >= 5
    assert client.counters.bad_lines >= 5
    await client.stop()
    await hs.stop()


@scenario
async def test_commands_nobody_handles_are_not_parsed(adapter: Adapter) -> None:
    """Half of real traffic is USER_SYNC, USER_IP and LOCK_RELEASED: without
    a handler for a command it is skipped unparsed (a malformed one is not
    even a bad line); once a handler asks for it, it is parsed, errors and
    all, and handed over."""
    hs = await homeserver()
    client = adapter.client(hs)
    await connected(client, hs, [])
    await hs.publish_raw("LOCK_RELEASED not enough arguments")
    await hs.publish_raw('LOCK_RELEASED ["worker1", "lock", "key"]')
    await wait_until(lambda: client.counters.lines >= 2)
    assert client.counters.bad_lines == 0
    released: list[Any] = []
    client.on_command(LockReleasedCommand, released.append)
    await hs.publish_raw("LOCK_RELEASED not enough arguments")
    await hs.publish_raw('LOCK_RELEASED ["worker1", "lock", "key"]')
    await wait_until(lambda: released)
    assert released == [LockReleasedCommand("worker1", "lock", "key")]
    assert client.counters.bad_lines == 1
    await client.stop()
    await hs.stop()


@scenario
async def test_slow_handler_memory_stays_bounded_and_nothing_is_lost(adapter: Adapter) -> None:
    """A handler far slower than its stream: the queue never holds more than
    max_pending_rows rows (plus a page); skipped rows are fetched back later,
    so every row still arrives exactly once, in order."""
    hs = await homeserver(page_limit=50)
    hs.write("to_device", [ToDeviceRow("@a")])
    client = adapter.client(hs, max_pending_rows=100)
    seen = Collector()
    peak = 0

    async def slow(batch: RowsReceived) -> None:
        nonlocal peak
        peak = max(peak, client.pending_rows("to_device"))
        seen(batch)
        await adapter.sleep(0.001)

    client.on_rows("to_device", slow)
    await connected(client, hs, ["to_device"])
    start = client.positions()["to_device"]["master"]
    for n in range(2000):
        hs.write("to_device", [ToDeviceRow(f"@u{n}")])
    await wait_until(
        lambda: client.positions()["to_device"]["master"] == hs.token("to_device"), timeout=60
    )
    assert seen.rows("to_device", "master") == expected(hs, "to_device", "master", start)
    assert client.counters.overflows >= 1
    assert peak <= 100 + 50
    await client.stop()
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_unreachable_writer_gap_is_reported_with_its_range() -> None:
    """When the writer cannot be reached for a fetch, the handler side learns
    the exact missing range; it is never silent."""
    hs = await homeserver()
    hs.write("pushers", [["@a", "app", "key", False]])
    config = hs.config_dict(worker_replication_secret="wrong")
    from synrepl.config import config_from_dict

    cfg = config_from_dict(config)
    client = ReplicationClient(reactor, cfg, fetcher=ReplicationHttpClient(reactor, cfg))
    gaps: list[GapUnfillable] = []
    client.on_gap(gaps.append)
    await connected(client, hs, ["pushers"])
    start = client.positions()["pushers"]["master"]
    hs.write_silently("pushers", [["@b", "app", "key", False]])
    hs.write_silently("pushers", [["@c", "app", "key", True]])
    hs.position("pushers")
    await wait_until(lambda: bool(gaps), what="a reported gap")
    assert (gaps[0].stream, gaps[0].writer, gaps[0].from_token, gaps[0].upto_token) == (
        "pushers",
        "master",
        start,
        start + 2,
    )
    await client.stop()
    await hs.stop()


@scenario
async def test_read_only_client_publishes_nothing(adapter: Adapter) -> None:
    """A read-only client sends not even REPLICATE, refuses to send anything,
    and still receives rows once a writer's own POSITION connects the stream."""
    hs = await homeserver()
    hs.write("typing", [TypingRow("!r", ())])
    client = adapter.client(hs, read_only=True)
    seen = Collector()
    client.on_rows("typing", seen)
    tap = ChannelTap(hs.server_name)
    await client.start()
    with pytest.raises(ReadOnlyError):
        client.send_remote_server_up("other.example")
    hs.position("typing")  # writers send POSITIONs on their own; no REPLICATE needed
    hs.write("typing", [TypingRow("!r2", ("@a",))])
    await wait_until(lambda: len(seen.batches) == 1)
    await client.stop()
    lines = [line for _, line in tap.lines(quiet=0.05)]
    assert not any(line.startswith("REPLICATE") for line in lines), lines
    assert lines  # the POSITION and RDATA above were seen here too
    await hs.stop()


@scenario
async def test_sent_commands_reach_the_channel_and_stop_clears_user_syncs(adapter: Adapter) -> None:
    """Typed send methods publish Synapse's lines on the right channels, and
    stopping after a USER_SYNC start sends CLEAR_USER_SYNC."""
    hs = await homeserver()
    hs.write("typing", [TypingRow("!r", ())])
    client = adapter.client(hs, instance_name="worker7", extra_channels=["USER_IP"])
    tap = ChannelTap(hs.server_name)
    await connected(client, hs, ["typing"])
    await client.send_user_sync("@a:test", "DEV", True, 1234)
    await client.send_user_ip("@a:test", "syt_secret", "10.0.0.1", "ua", "DEV", 99)
    await client.send_federation_ack(17)
    await client.stop()
    got = tap.lines()
    lines = {line for _, line in got}
    assert "USER_SYNC worker7 @a:test DEV start 1234" in lines
    assert "FEDERATION_ACK worker7 17" in lines
    assert "CLEAR_USER_SYNC worker7" in lines
    assert (
        hs.server_name + "/USER_IP",
        'USER_IP @a:test ["syt_secret","10.0.0.1","ua","DEV",99]',
    ) in got
    await hs.stop()


@scenario
async def test_wait_for_stream_position(adapter: Adapter) -> None:
    """wait_for_stream_position fires once the handlers processed that token."""
    hs = await homeserver()
    hs.write("account_data", [["@a", None, "m.direct"]])
    client = adapter.client(hs)
    processed: list[int] = []

    async def handler(batch: RowsReceived) -> None:
        await adapter.sleep(0.05)
        processed.append(batch.token)

    client.on_rows("account_data", handler)
    await connected(client, hs, ["account_data"])
    token = hs.write("account_data", [["@a", "!r", "m.tag"]])
    waiter = client.wait_for_stream_position("account_data", "master", token)
    assert not (waiter.done() if adapter.name == "asyncio" else waiter.called)
    await waiter
    assert processed == [token]
    await client.wait_for_stream_position("account_data", "master", token)  # reached: at once
    await client.stop()
    await hs.stop()


def test_persisted_upto_waits_for_every_configured_writer() -> None:
    """Following every stream, the minimum covers the writers the config names
    for a stream, not only those heard from so far."""
    from synrepl.config import config_from_dict

    config = config_from_dict(
        {
            "server_name": "units.test",
            "instance_map": {
                "main": {"host": "127.0.0.1", "port": 1},
                "p1": {"host": "127.0.0.1", "port": 2},
                "p2": {"host": "127.0.0.1", "port": 3},
            },
            "stream_writers": {"events": ["p1", "p2"]},
        }
    )
    client = ReplicationClient(reactor, config, instance_name="me", fetcher=object())  # type: ignore[arg-type]
    client._line_received("units.test", "POSITION events p1 5 5")
    assert client.persisted_upto("events") is None  # p2 not heard yet
    client._line_received("units.test", "POSITION events p2 3 3")
    assert client.persisted_upto("events") == 3


@pytest_twisted.ensureDeferred
async def test_a_handler_coroutine_may_await_deferreds_and_asyncio_futures() -> None:
    """Whatever the reactor, a coroutine handler that awaits a Deferred runs to
    its end before its rows count; under Twisted's asyncio reactor (the unit
    suite's) it may await asyncio futures too; one that fails is retried."""

    from synrepl.delivery import HandlerFailurePolicy

    hs = await homeserver()
    hs.write("typing", [TypingRow("!r", ())])
    client = client_for(hs, failure_policy=HandlerFailurePolicy(retries=1, base_delay=0.05))
    finished: list[int] = []
    calls: list[int] = []
    on_asyncio = hasattr(reactor, "_asyncioEventloop")

    async def handler(batch: RowsReceived) -> None:
        calls.append(batch.token)
        await sleep(0.01)  # a Deferred
        if on_asyncio:
            await asyncio.sleep(0.01)  # an asyncio future
        if len(calls) == 1:
            raise RuntimeError("the first call fails")
        finished.append(batch.token)

    client.on_rows("typing", handler)
    await connected(client, hs, ["typing"])
    token = hs.write("typing", [TypingRow("!r", ("@a",))])
    await wait_until(lambda: client.positions()["typing"]["master"] == token)
    assert calls == [token, token] and finished == [token]
    assert client.counters.handler_errors == 1 and client.counters.handler_retries == 1
    await client.stop()
    await hs.stop()
