"""The delivery faults that fault tests against real Synapse found, on real Redis.

Each scenario is one report of issue 9 made small: a slow handler, a busy
writer, a stream without POSITIONs, a handler that completes synchronously
after a stall, a start map ahead of the writer.  Each asserts the invariant
that matters: the handler sees every row of the writer's history past its
start exactly once, in order, or the loss is reported with its range.
"""

from __future__ import annotations

from typing import Any

from client_helpers import (
    Adapter,
    Collector,
    event,
    homeserver,
    scenario,
    sleep,
    wait_until,
)

from synrepl import _json
from synrepl.positions import RowsReceived
from synrepl.streams import CachesRow
from synrepl.testing.homeserver import FakeHomeserver
from synrepl.twisted.client import ReplicationClient


def invalidation(n: int) -> CachesRow:
    return CachesRow("get_user_by_id", (f"@u{n}:test",), n)


def queued_rows(client: ReplicationClient, stream: str) -> int:
    return client.pending_rows(stream)


def history_after(hs: FakeHomeserver, stream: str, writer: str, after: int) -> list[Any]:
    return [(t, r) for t, r in hs.history(stream, writer=writer) if t > after]


async def caught_up(client: ReplicationClient, stream: str, writer: str, token: int) -> None:
    await wait_until(
        lambda: client.positions().get(stream, {}).get(writer) == token,
        timeout=60,
        what=f"{stream}/{writer} processed up to {token}",
    )


@scenario
async def test_slow_http_during_refill_loses_nothing(adapter: Adapter) -> None:
    """A slow handler overflows its bound while the writer's HTTP answers are
    slow and live rows keep coming: every row still arrives exactly once, in
    order (the report: 18 and 36 of 330 events lost just after refill pages)."""
    hs = await homeserver(page_limit=1000)
    hs.write("events", [event(0)])
    client = adapter.client(hs, max_pending_rows=50)
    seen = Collector()
    batches = 0

    async def slow(batch: RowsReceived) -> None:
        nonlocal batches
        seen(batch)
        batches += 1
        await adapter.sleep(0.002 * len(batch.rows) + (0.5 if batches % 40 == 0 else 0))

    client.on_rows("events", slow)
    await client.start()
    await wait_until(lambda: "events" in client.positions(), what="first POSITION")
    start = client.positions()["events"]["master"]
    hs.http_delay = 0.3
    for n in range(1, 501):  # about 4 s of steady writing
        hs.write("events", [event(n), event(-n)] if n % 9 == 0 else [event(n)])
        if n % 3 == 0:
            await sleep(0.025)
    for _ in range(3):  # the writer's POSITIONs after the burst
        await sleep(0.3)
        hs.position("events")
    await caught_up(client, "events", "master", hs.token("events"))
    assert seen.rows("events", "master") == history_after(hs, "events", "master", start)
    assert client.counters.overflows >= 1
    assert client.counters.gaps == 0
    await client.stop()
    await hs.stop()


@scenario
async def test_overflow_while_the_handler_holds_a_writers_only_batch(adapter: Adapter) -> None:
    """On ``caches`` (idle writers send no POSITION), the queue overflows while
    the handler is busy with the one batch of a second writer: that batch is
    not handed over again when the skipped range is fetched."""
    hs = await homeserver(writers=("master", "persister1"))
    hs.write("caches", [invalidation(0)], writer="master")
    hs.write("caches", [invalidation(0)], writer="persister1")
    client = adapter.client(hs, max_pending_rows=5)
    seen = Collector()
    gate = adapter.gate()

    def handler(batch: RowsReceived) -> Any:
        seen(batch)
        if batch.writer == "persister1" and len(seen.batches) == 1:
            return gate.awaitable  # hold the persister's only batch
        return None

    client.on_rows("caches", handler)
    await client.start()
    await wait_until(
        lambda: set(client.positions().get("caches", {})) == {"master", "persister1"},
        what="both writers connected",
    )
    start = client.positions()["caches"]
    hs.write("caches", [invalidation(1)], writer="persister1")
    await wait_until(lambda: len(seen.batches) == 1, what="the held batch")
    for n in range(2, 12):
        hs.write("caches", [invalidation(n)], writer="master")
    hs.write("caches", [invalidation(12)], writer="persister1")  # overflows
    await sleep(0.3)
    gate.open()
    await caught_up(client, "caches", "master", hs.history("caches", writer="master")[-1][0])
    await caught_up(
        client, "caches", "persister1", hs.history("caches", writer="persister1")[-1][0]
    )
    for writer in ("master", "persister1"):
        assert seen.rows("caches", writer) == history_after(hs, "caches", writer, start[writer])
    await client.stop()
    await hs.stop()


@scenario
async def test_thousands_of_batches_behind_one_slow_call_then_synchronous(adapter: Adapter) -> None:
    """Batches queued behind one slow handler call, then handled synchronously
    (an already fired Deferred or done future), are all delivered: no recursion stops the stream."""
    hs = await homeserver()
    hs.write("events", [event(0)])
    client = adapter.client(hs, max_pending_rows=100_000)
    seen = Collector()
    gate = adapter.gate()

    def handler(batch: RowsReceived) -> Any:
        seen(batch)
        return gate.awaitable if len(seen.batches) == 1 else adapter.done()

    client.on_rows("events", handler)
    await client.start()
    await wait_until(lambda: "events" in client.positions(), what="first POSITION")
    start = client.positions()["events"]["master"]
    for n in range(1, 2001):
        hs.write("events", [event(n)])
    await wait_until(lambda: queued_rows(client, "events") == 1999, what="2,000 queued")
    gate.open()
    await caught_up(client, "events", "master", hs.token("events"))
    assert seen.rows("events", "master") == history_after(hs, "events", "master", start)
    assert client.counters.handler_errors == 0
    await client.stop()
    await hs.stop()


@scenario
async def test_start_map_ahead_of_the_writer_is_loud_and_hides_nothing(adapter: Adapter) -> None:
    """A position file 500 tokens ahead of the writer (kept across a database
    restore): the client says so, trusts the writer, and delivers the rows
    the writer writes afterwards instead of dropping them as duplicates."""
    hs = await homeserver()
    for n in range(10):
        hs.write("events", [event(n)])
    client = adapter.client(hs, start={"events": {"master": hs.token("events") + 500}})
    seen = Collector()
    client.on_rows("events", seen)
    behind: list[Any] = []
    client.on_reset(behind.append)
    await client.start()
    await wait_until(lambda: bool(behind), what="the writer-behind notice")
    assert (behind[0].stream, behind[0].writer) == ("events", "master")
    assert (behind[0].old_token, behind[0].new_token) == (510, 10)
    for n in range(10, 20):
        hs.write("events", [event(n)])
    await caught_up(client, "events", "master", hs.token("events"))
    assert seen.rows("events", "master") == history_after(hs, "events", "master", 10)
    assert client.counters.writers_behind == 1
    await client.stop()
    await hs.stop()


@scenario
async def test_refill_starts_at_half_the_bound(adapter: Adapter) -> None:
    """After an overflow the next page is asked for while the handler still has
    rows to work on (at half the bound), not once it has run dry."""
    hs = await homeserver(page_limit=10)
    hs.write("events", [event(0)])
    client = adapter.client(hs, max_pending_rows=40)
    depth_at_request: list[int] = []
    hs.on_updates_request = lambda *_: depth_at_request.append(queued_rows(client, "events"))

    async def slow(batch: RowsReceived) -> None:
        await adapter.sleep(0.003)

    client.on_rows("events", slow)
    await client.start()
    await wait_until(lambda: "events" in client.positions(), what="first POSITION")
    for n in range(1, 401):
        hs.write("events", [event(n)])
    await caught_up(client, "events", "master", hs.token("events"))
    assert len(depth_at_request) >= 10
    busy = [d for d in depth_at_request if d > 0]
    assert len(busy) >= len(depth_at_request) * 3 // 4, depth_at_request
    await client.stop()
    await hs.stop()


@scenario
async def test_position_from_a_writer_the_config_does_not_name_is_no_loss(adapter: Adapter) -> None:
    """POSITIONs from an instance nobody configured (a stray process, a forgery)
    are counted and skipped for gap filling: no fetch, no false "rows lost"."""
    hs = await homeserver()
    hs.write("events", [event(0)])
    client = adapter.client(hs)
    seen = Collector()
    client.on_rows("events", seen)
    gaps: list[Any] = []
    client.on_gap(gaps.append)
    await client.start()
    await wait_until(lambda: "events" in client.positions(), what="first POSITION")
    await hs.publish_raw("POSITION events ghost 5 5")
    await hs.publish_raw("POSITION events ghost 9 12")  # a "gap" nobody can fill
    await hs.publish_raw("RDATA events ghost 13 " + _json.dumps(event(13).to_raw()))
    token = hs.write("events", [event(1)])
    await caught_up(client, "events", "master", token)
    await wait_until(lambda: client.positions()["events"].get("ghost") == 13, what="ghost")
    assert gaps == [] and client.counters.gaps == 0
    assert client.counters.unnamed_writer_commands == 3
    assert client.counters.wire.unnamed_writer_gaps == 1
    assert [b.token for b in seen.batches if b.writer == "ghost"] == [13]
    assert not any(writer == "ghost" for writer, _, _ in hs.http_requests)
    await client.stop()
    await hs.stop()
