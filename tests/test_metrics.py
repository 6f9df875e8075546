"""What a client measures (synrepl.metrics) and exports (synrepl.prometheus),
on real Redis against the FakeHomeserver, for both adapters."""

from __future__ import annotations

from typing import Any

import pytest
from client_helpers import Adapter, Collector, event, homeserver, scenario, sleep, wait_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_helpers import check_metrics, samples

from synrepl.metrics import LATENCY_BOUNDS, Histogram, LatencyRecorder
from synrepl.positions import RowsReceived
from synrepl.prometheus import register_client


def test_latency_buckets_are_prometheus_shaped() -> None:
    recorder = LatencyRecorder()
    for seconds in (0.0005, 0.001, 0.003, 100.0):
        recorder.observe("events", seconds)
    histogram = recorder.snapshot()["events"]
    assert histogram.count == 4
    assert histogram.total == pytest.approx(100.0045)
    cumulative = dict(histogram.cumulative())
    assert cumulative[0.001] == 2  # an upper bound is inclusive
    assert cumulative[0.005] == 3
    assert cumulative[60.0] == 3
    assert cumulative[float("inf")] == 4
    assert Histogram.empty().cumulative()[-1] == (float("inf"), 0)
    assert len(histogram.counts) == len(LATENCY_BOUNDS) + 1


@scenario
async def test_positions_lag_and_totals_per_writer(adapter: Adapter) -> None:
    """A held handler: the wire runs ahead of what is processed (lag in
    tokens, rows queued); a row written silently is fetched (fetch totals and
    latency); released, the lag is 0 and every row is counted."""
    hs = await homeserver()
    hs.write("events", [event(0)])
    client = adapter.client(hs)
    seen = Collector()
    gate = adapter.gate()

    def handler(batch: RowsReceived) -> Any:
        seen(batch)
        return gate.awaitable if len(seen.batches) == 1 else None

    client.on_rows("events", handler)
    assert client.metrics().streams == ()
    await client.start()
    await wait_until(lambda: "events" in client.positions(), what="first POSITION")
    start = client.positions()["events"]["master"]
    for n in range(1, 6):
        hs.write("events", [event(n)])
    await wait_until(lambda: len(seen.batches) == 1, what="the held batch")
    await sleep(0.1)
    held = client.metrics()
    writer = held.writer("events", "master")
    assert writer is not None
    assert writer.processed == start
    assert writer.wire == hs.token("events")
    assert writer.lag_tokens == hs.token("events") - start
    assert writer.seconds_since_row is not None and writer.seconds_since_row >= 0
    stream = held.stream("events")
    assert stream is not None and stream.queued_rows == 4  # the held one is out, not queued
    assert stream.handler_latency is None  # not measured until asked
    assert held.connected and held.reconnects == 0

    client.measure_latency()
    gate.open()
    hs.write_silently("events", [event(6)])
    hs.position("events")  # reveals the silent row: fetched over HTTP
    hs.write("events", [event(7)])
    await wait_until(
        lambda: client.positions()["events"]["master"] == hs.token("events"), what="caught up"
    )
    done = client.metrics()
    writer = done.writer("events", "master")
    stream = done.stream("events")
    assert writer is not None and stream is not None
    assert writer.lag_tokens == 0
    assert stream.rows_delivered == len(seen.rows("events", "master")) == 7
    assert stream.rows_fetched >= 1 and stream.fetch_pages >= 1
    assert stream.fetch_latency is not None and stream.fetch_latency.count >= 1
    assert stream.handler_latency is not None and stream.handler_latency.count >= 1
    assert stream.gaps_unfillable == 0 and stream.queued_rows == 0
    assert done.lines >= 8 and done.bad_lines == 0
    await client.stop()
    await hs.stop()


@scenario
async def test_prometheus_exposition(adapter: Adapter) -> None:
    """The collector exports the snapshot under the documented names, and
    promtool accepts the text."""
    hs = await homeserver()
    hs.write("events", [event(0)])
    client = adapter.client(hs)
    client.on_rows("events", Collector())
    registry = CollectorRegistry()
    register_client(client, registry=registry)
    await client.start()
    await wait_until(lambda: "events" in client.positions(), what="first POSITION")
    for n in range(1, 4):
        hs.write("events", [event(n)])
    token = hs.token("events")
    await wait_until(lambda: client.positions()["events"]["master"] == token, what="caught up")
    await hs.publish_raw("RDATA events master 99 not json")
    await wait_until(lambda: client.counters.bad_lines == 1, what="the bad line counted")

    got = samples(generate_latest(registry))
    name = client.instance_name
    pair = (("client", name), ("stream", "events"), ("writer", "master"))
    per_stream = (("client", name), ("stream", "events"))
    assert got["synrepl_stream_processed_position", pair] == token
    assert got["synrepl_stream_wire_position", pair] == token
    assert got["synrepl_stream_lag_tokens", pair] == 0
    assert got["synrepl_stream_last_row_age_seconds", pair] >= 0
    assert got["synrepl_rows_delivered_total", per_stream] == 3
    assert got["synrepl_handler_duration_seconds_count", per_stream] >= 1
    assert got["synrepl_redis_connected", (("client", name),)] == 1
    assert got["synrepl_bad_lines_total", (("client", name),)] == 1
    assert got["synrepl_gaps_unfillable_total", per_stream] == 0
    exposition = generate_latest(registry)
    await client.stop()
    await hs.stop()
    check_metrics(exposition)
