"""What a client measures about its replication, as typed snapshots.

:meth:`ReplicationClient.metrics() <synrepl._client_core.ClientCore.metrics>`
returns a :class:`ClientMetrics`: per (stream, writer) the position the
handlers processed, the newest position known from the wire and the lag
between them (in tokens, and in seconds since that writer's last row), per
stream the rows delivered and fetched, the gaps and the queue, and the
client's connection and error totals.  These are plain values, readable
without Prometheus; :mod:`synrepl.prometheus` turns the same snapshot into
Prometheus metrics at scrape time, so a client that nobody scrapes pays
only for the counting.

Latencies are :class:`Histogram` values over fixed bucket bounds
(:data:`LATENCY_BOUNDS`, in seconds).  Fetch latency is always measured
(fetches are rare); handler latency costs two clock reads a batch, so it is
measured only once :meth:`~synrepl._client_core.ClientCore.measure_latency`
was called (the Prometheus collector calls it).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping

import attrs

__all__ = (
    "LATENCY_BOUNDS",
    "ClientMetrics",
    "Histogram",
    "LatencyRecorder",
    "StreamMetrics",
    "WriterMetrics",
)

#: Upper bounds of the latency buckets, in seconds (from 1 ms to 1 min):
#: a handler of a millisecond and an HTTP fetch that waited a minute both land
#: in a bucket of their own.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


@attrs.frozen
class Histogram:
    """Observations counted into buckets.

    ``counts[i]`` is the number of observations at or below ``bounds[i]``
    and above the bound before it; ``counts[-1]`` (one more than the
    bounds) those above the last bound.  ``total`` is their sum, in
    seconds.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @classmethod
    def empty(cls, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> Histogram:
        """No observations yet."""
        return cls(bounds, (0,) * (len(bounds) + 1), 0.0)

    @property
    def count(self) -> int:
        """How many observations there were."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with +Inf: the
        shape Prometheus histograms take."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class LatencyRecorder:
    """Counts durations into :data:`LATENCY_BOUNDS` buckets, per key (a stream)."""

    __slots__ = ("_counts", "_totals")

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}
        self._totals: dict[str, float] = {}

    def observe(self, key: str, seconds: float) -> None:
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = [0] * (len(LATENCY_BOUNDS) + 1)
            self._totals[key] = 0.0
        counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self._totals[key] += seconds

    def snapshot(self) -> dict[str, Histogram]:
        return {
            key: Histogram(LATENCY_BOUNDS, tuple(counts), self._totals[key])
            for key, counts in self._counts.items()
        }


@attrs.frozen
class WriterMetrics:
    """One writer of one stream, as the client sees it."""

    stream: str
    writer: str
    #: The token up to which the handlers have processed this writer's rows
    #: (None: not known yet).
    processed: int | None
    #: The newest token known from the wire: the writer's last RDATA or
    #: POSITION, or the target of a fetch under way.
    wire: int | None
    #: Seconds since the last row of this writer arrived (None: none yet).
    seconds_since_row: float | None

    @property
    def lag_tokens(self) -> int | None:
        """How far the handlers are behind what the writer announced."""
        if self.processed is None or self.wire is None:
            return None
        return max(0, self.wire - self.processed)


@attrs.frozen
class StreamMetrics:
    """One stream's totals (they only grow) and its queue now."""

    stream: str
    rows_delivered: int
    batches_delivered: int
    rows_fetched: int
    fetch_pages: int
    fetch_failures: int
    #: Ranges reported lost (each a GapUnfillable).
    gaps_unfillable: int
    dead_lettered_batches: int
    #: Rows queued for the handlers now.
    queued_rows: int
    #: How long HTTP fetches of this stream took (all writers).
    fetch_latency: Histogram | None
    #: How long the handlers took per batch (None: not measured, see
    #: :meth:`~synrepl._client_core.ClientCore.measure_latency`).
    handler_latency: Histogram | None


@attrs.frozen
class ClientMetrics:
    """Everything :mod:`synrepl.prometheus` exports for one client."""

    instance_name: str
    server_name: str
    #: Whether the Redis subscription is confirmed now.
    connected: bool
    #: Redis subscriptions after the first.
    reconnects: int
    lines: int
    bad_lines: int
    unknown_commands: int
    handler_errors: int
    writers: tuple[WriterMetrics, ...]
    streams: tuple[StreamMetrics, ...]

    def writer(self, stream: str, writer: str) -> WriterMetrics | None:
        """The figures of one (stream, writer), if the client knows it."""
        for w in self.writers:
            if w.stream == stream and w.writer == writer:
                return w
        return None

    def stream(self, stream: str) -> StreamMetrics | None:
        """The figures of one stream, if the client has any."""
        for s in self.streams:
            if s.stream == stream:
                return s
        return None


def merged_keys(*maps: Mapping[str, object]) -> list[str]:
    """The keys of all the maps, sorted: the streams any figure mentions."""
    keys: set[str] = set()
    for m in maps:
        keys.update(m)
    return sorted(keys)
