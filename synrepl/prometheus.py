"""Prometheus metrics for a client, read from its snapshot at scrape time.

Needs the ``metrics`` extra (prometheus-client)::

    from prometheus_client import start_http_server
    from synrepl.prometheus import register_client

    register_client(client)          # the default registry
    start_http_server(9469, addr="127.0.0.1")

Nothing is counted twice: the collector asks
:meth:`~synrepl._client_core.ClientCore.metrics` for a snapshot on every
scrape and turns it into metric families, so both adapters export exactly
the same figures, from the core.  Names follow Prometheus' conventions
(``synrepl_`` prefix, ``_total`` counters, seconds); labels are ``client``
(the instance name), ``stream`` and ``writer``, never a room or a user.
``docs/metrics.md`` lists them all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from synrepl.metrics import ClientMetrics, Histogram

if TYPE_CHECKING:
    from synrepl.export import Exporter

__all__ = ("ClientCollector", "ExporterCollector", "register_client", "histogram_buckets")


class MeasuredClient(Protocol):
    """What the collector needs of a client (either adapter's)."""

    def metrics(self) -> ClientMetrics: ...

    def measure_latency(self) -> None: ...


def histogram_buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """A snapshot histogram as prometheus-client's cumulative buckets."""
    return [
        ("+Inf" if bound == float("inf") else repr(bound), float(n))
        for bound, n in histogram.cumulative()
    ]


class ClientCollector(Collector):
    """Exports one or more clients' snapshots (labelled by ``client``)."""

    def __init__(self, clients: Iterable[MeasuredClient]) -> None:
        self._clients = list(clients)
        for client in self._clients:
            client.measure_latency()

    def collect(self) -> Iterator[Metric]:
        snapshots = [c.metrics() for c in self._clients]
        pair = ["client", "stream", "writer"]
        per_stream = ["client", "stream"]
        one = ["client"]
        processed = GaugeMetricFamily(
            "synrepl_stream_processed_position",
            "Token up to which the handlers processed the writer's rows.",
            labels=pair,
        )
        wire = GaugeMetricFamily(
            "synrepl_stream_wire_position",
            "Newest token of the writer known from the wire (RDATA, POSITION or a fetch's target).",
            labels=pair,
        )
        lag = GaugeMetricFamily(
            "synrepl_stream_lag_tokens",
            "Tokens between what the writer announced and what the handlers processed.",
            labels=pair,
        )
        age = GaugeMetricFamily(
            "synrepl_stream_last_row_age_seconds",
            "Seconds since the writer's last row arrived.",
            labels=pair,
        )
        counters = {
            name: CounterMetricFamily(f"synrepl_{name}", doc, labels=per_stream)
            for name, doc in (
                ("rows_delivered", "Rows the handlers finished with."),
                ("batches_delivered", "Batches the handlers finished with."),
                ("rows_fetched", "Rows fetched over HTTP from the writers."),
                ("fetch_pages", "HTTP pages fetched from the writers."),
                ("fetch_failures", "HTTP fetches that failed (each reported as a gap)."),
                ("gaps_unfillable", "Ranges of rows reported lost."),
                ("dead_lettered_batches", "Batches given up on and dead-lettered."),
            )
        }
        queued = GaugeMetricFamily(
            "synrepl_queued_rows", "Rows queued for the handlers.", labels=per_stream
        )
        fetch_latency = HistogramMetricFamily(
            "synrepl_fetch_duration_seconds",
            "How long HTTP fetches from the writers took.",
            labels=per_stream,
        )
        handler_latency = HistogramMetricFamily(
            "synrepl_handler_duration_seconds",
            "How long the handlers took per batch.",
            labels=per_stream,
        )
        connected = GaugeMetricFamily(
            "synrepl_redis_connected", "1 while the Redis subscription is confirmed.", labels=one
        )
        #: (family, the ClientMetrics field it counts)
        totals = [
            (CounterMetricFamily(f"synrepl_{name}", doc, labels=one), field)
            for name, field, doc in (
                ("redis_reconnects", "reconnects", "Redis subscriptions after the first."),
                ("lines", "lines", "Lines received from Redis."),
                ("bad_lines", "bad_lines", "Lines and fetched rows that did not parse."),
                (
                    "unknown_commands",
                    "unknown_commands",
                    "Lines naming a command synrepl does not know.",
                ),
                ("handler_errors", "handler_errors", "Handler calls that raised or failed."),
            )
        ]
        for m in snapshots:
            client = m.instance_name
            for w in m.writers:
                labels = [client, w.stream, w.writer]
                if w.processed is not None:
                    processed.add_metric(labels, w.processed)
                if w.wire is not None:
                    wire.add_metric(labels, w.wire)
                if w.lag_tokens is not None:
                    lag.add_metric(labels, w.lag_tokens)
                if w.seconds_since_row is not None:
                    age.add_metric(labels, w.seconds_since_row)
            for s in m.streams:
                labels = [client, s.stream]
                for name, family in counters.items():
                    family.add_metric(labels, getattr(s, name))
                queued.add_metric(labels, s.queued_rows)
                for histogram_family, histogram in (
                    (fetch_latency, s.fetch_latency),
                    (handler_latency, s.handler_latency),
                ):
                    if histogram is not None:
                        histogram_family.add_metric(
                            labels, histogram_buckets(histogram), histogram.total
                        )
            connected.add_metric([client], 1.0 if m.connected else 0.0)
            for total_family, field in totals:
                total_family.add_metric([client], getattr(m, field))
        yield from (processed, wire, lag, age, *counters.values(), queued)
        yield from (fetch_latency, handler_latency, connected)
        yield from (family for family, _ in totals)


def register_client(
    *clients: MeasuredClient, registry: CollectorRegistry = REGISTRY
) -> ClientCollector:
    """Export these clients' metrics from ``registry`` (and start timing
    their handlers); returns the collector, for ``registry.unregister``."""
    collector = ClientCollector(clients)
    registry.register(collector)
    return collector


class ExporterCollector(Collector):
    """Exports an :class:`~synrepl.export.Exporter`'s totals (label ``sink``).

    ``synrepl_export_waiting_seconds`` is how long the current batch has
    waited for a sink that is down: how far behind the export has fallen.
    """

    def __init__(self, exporter: Exporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        exporter = self._exporter
        stats = exporter.stats
        sink = exporter.sink.target
        for name, documentation, value in (
            ("messages", "Messages the sink acknowledged.", stats.messages),
            ("batches", "Sends the sink acknowledged.", stats.batches),
            ("skipped", "Messages left to other partitions or handed over.", stats.skipped),
            (
                "sink_failures",
                "Sends or connections that failed with the sink down.",
                stats.sink_failures,
            ),
        ):
            counter = CounterMetricFamily(f"synrepl_export_{name}", documentation, labels=["sink"])
            counter.add_metric([sink], float(value))
            yield counter
        up = GaugeMetricFamily(
            "synrepl_export_sink_up", "1 if the last send to the sink succeeded.", labels=["sink"]
        )
        up.add_metric([sink], 1.0 if stats.sink_up else 0.0)
        waiting = GaugeMetricFamily(
            "synrepl_export_waiting_seconds",
            "How long the current batch has waited for the sink (0: none waits).",
            labels=["sink"],
        )
        waiting.add_metric([sink], exporter.behind())
        acknowledged = GaugeMetricFamily(
            "synrepl_export_acknowledged_token",
            "The last token the sink acknowledged, per stream and writer.",
            labels=["sink", "stream", "writer"],
        )
        for stream, writers in sorted(stats.acknowledged.items()):
            for writer, token in sorted(writers.items()):
                acknowledged.add_metric([sink, stream, writer], float(token))
        yield from (up, waiting, acknowledged)
