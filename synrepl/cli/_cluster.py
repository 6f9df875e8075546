"""What the channel says about the whole cluster, for ``synrepl exporter``.

:class:`ClusterView` takes every command seen on the channel (it never sends
one) and keeps, per (stream, writer), the newest token announced, the rows
and when the writer was last heard; per (sender, command) how many were
seen.  It keeps no clock: each call says what time it is, so tests run it on
any clock they like.  :class:`ClusterCollector` turns it into Prometheus
metrics at scrape time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from synrepl.cli._render import Stats
from synrepl.commands import Command, PositionCommand, RdataCommand, sender_of
from synrepl.config import SynapseConfig
from synrepl.streams import STREAM_NAMES

__all__ = ("ClusterCollector", "ClusterView", "WriterSeen")


@attrs.define
class WriterSeen:
    """One writer of one stream, as heard on the channel."""

    #: When it was last heard from (any RDATA or POSITION of the stream).
    heard_at: float
    #: The newest token it announced (RDATA or POSITION), None while it has
    #: sent only rows of an unfinished batch.
    token: int | None = None
    rows: int = 0
    #: When its last row came (None: it sent only POSITIONs).
    row_at: float | None = None


class ClusterView:
    """Per (stream, writer) positions and per (sender, command) counts.

    Args:
        config: names the writers each stream should have (those it fixes).
    """

    def __init__(self, config: SynapseConfig) -> None:
        self.writers: dict[tuple[str, str], WriterSeen] = {}
        self.commands: Counter[tuple[str, str]] = Counter()
        self.expected: dict[str, tuple[str, ...]] = {
            stream: writers
            for stream in STREAM_NAMES
            if (writers := config.stream_writers.writers_for_stream(stream))
        }

    def saw(self, cmd: Command, now: float) -> None:
        """One command from the channel."""
        self.commands[sender_of(cmd) or "", cmd.NAME] += 1
        if isinstance(cmd, RdataCommand):
            seen = self._heard(cmd.stream_name, cmd.instance_name, now)
            seen.rows += 1
            seen.row_at = now
            if cmd.token is not None:
                seen.token = cmd.token  # the newest, also when a writer restarted lower
        elif isinstance(cmd, PositionCommand):
            seen = self._heard(cmd.stream_name, cmd.instance_name, now)
            seen.token = cmd.new_token

    def streams(self) -> list[str]:
        """Every stream heard of or expected."""
        return sorted({s for s, _ in self.writers} | set(self.expected))

    def writers_of(self, stream: str) -> list[str]:
        """The stream's writers: those the config names, and those heard."""
        heard = {w for s, w in self.writers if s == stream}
        return sorted(heard | set(self.expected.get(stream, ())))

    def minimum(self, stream: str) -> int | None:
        """The lowest newest token over the stream's writers: what a worker
        waits for.  None while an expected writer has announced nothing."""
        tokens = [self.token(stream, w) for w in self.writers_of(stream)]
        if not tokens or None in tokens:
            return None
        return min(t for t in tokens if t is not None)

    def token(self, stream: str, writer: str) -> int | None:
        seen = self.writers.get((stream, writer))
        return None if seen is None else seen.token

    def lag(self, stream: str, writer: str) -> int | None:
        """How far the writer's newest token is behind the stream's newest."""
        token = self.token(stream, writer)
        tokens = [
            p.token for (s, _), p in self.writers.items() if s == stream and p.token is not None
        ]
        if token is None or not tokens:
            return None
        return max(tokens) - token

    def silent(self, stream: str, writer: str) -> bool:
        """A writer not heard from since the start."""
        return (stream, writer) not in self.writers

    def _heard(self, stream: str, writer: str, now: float) -> WriterSeen:
        seen = self.writers.get((stream, writer))
        if seen is None:
            seen = self.writers[stream, writer] = WriterSeen(heard_at=now)
        else:
            seen.heard_at = now
        return seen


class ClusterCollector(Collector):
    """The exporter's ``/metrics``: the cluster view and the exporter's own health."""

    def __init__(
        self,
        view: ClusterView,
        stats: Stats,
        now: Callable[[], float],
        connected: Callable[[], bool],
        wall_clock_start: float,
    ) -> None:
        self._view = view
        self._stats = stats
        self._now = now
        self._connected = connected
        self._wall_clock_start = wall_clock_start

    def collect(self) -> Iterator[Metric]:
        view, now = self._view, self._now()
        pair = ["stream", "writer"]
        position = GaugeMetricFamily(
            "synrepl_stream_position",
            "Newest token the writer announced on the channel (RDATA or POSITION).",
            labels=pair,
        )
        lag = GaugeMetricFamily(
            "synrepl_stream_writer_lag_tokens",
            "Tokens the writer's newest announcement is behind the stream's newest.",
            labels=pair,
        )
        heard = GaugeMetricFamily(
            "synrepl_stream_writer_last_heard_age_seconds",
            "Seconds since the writer last sent an RDATA or POSITION of the stream.",
            labels=pair,
        )
        row_age = GaugeMetricFamily(
            "synrepl_stream_writer_last_row_age_seconds",
            "Seconds since the writer's last row of the stream.",
            labels=pair,
        )
        silent = GaugeMetricFamily(
            "synrepl_stream_writer_silent",
            "1 for a writer the configuration names for the stream that has not been "
            "heard from since the exporter started.",
            labels=pair,
        )
        rows = CounterMetricFamily(
            "synrepl_stream_rows", "RDATA rows seen on the channel.", labels=pair
        )
        minimum = GaugeMetricFamily(
            "synrepl_stream_minimum_position",
            "Lowest newest token over the stream's writers (absent while one is silent).",
            labels=["stream"],
        )
        for stream in view.streams():
            expected = view.expected.get(stream, ())
            for writer in view.writers_of(stream):
                labels = [stream, writer]
                seen = view.writers.get((stream, writer))
                if writer in expected:
                    silent.add_metric(labels, 1.0 if view.silent(stream, writer) else 0.0)
                if seen is None:
                    continue
                rows.add_metric(labels, seen.rows)
                if seen.token is not None:
                    position.add_metric(labels, seen.token)
                if (behind := view.lag(stream, writer)) is not None:
                    lag.add_metric(labels, behind)
                heard.add_metric(labels, now - seen.heard_at)
                if seen.row_at is not None:
                    row_age.add_metric(labels, now - seen.row_at)
            if (lowest := view.minimum(stream)) is not None:
                minimum.add_metric([stream], lowest)
        commands = CounterMetricFamily(
            "synrepl_commands",
            "Replication commands seen on the channel, by the instance they name as "
            'sender ("" where the command names none) and command.',
            labels=["sender", "command"],
        )
        for (sender, name), n in sorted(view.commands.items()):
            commands.add_metric([sender, name], n)
        yield from (position, lag, heard, row_age, silent, rows, minimum, commands)
        yield from self._health()

    def _health(self) -> Iterator[Metric]:
        stats = self._stats
        yield GaugeMetricFamily(
            "synrepl_exporter_redis_connected",
            "1 while the exporter's Redis subscription is up.",
            value=1.0 if self._connected() else 0.0,
        )
        for name, doc, value in (
            ("redis_reconnects", "Redis subscriptions after the first.", stats.reconnects),
            ("lines", "Lines read from the channel.", stats.lines),
            ("bad_lines", "Lines that did not parse.", stats.bad_lines),
            ("unknown_commands", "Lines naming an unknown command.", stats.unknown_commands),
        ):
            yield CounterMetricFamily(f"synrepl_exporter_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "synrepl_exporter_start_time_seconds",
            "When the exporter started, in seconds since the epoch.",
            value=self._wall_clock_start,
        )
