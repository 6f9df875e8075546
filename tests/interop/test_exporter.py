"""``synrepl exporter`` on the real multi-writer cluster, scraped by a real
Prometheus (Debian's package, started here on a free loopback port).

A PromQL query through Prometheus' HTTP API gives, for every events writer,
the position that writer last announced on the channel (checked against an
independent wire tap); with one persister stopped (SIGSTOP) while the other
keeps writing, the stopped writer's lag, in tokens and in seconds, grows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from client_helpers import poll_until
from harness import Deployment, free_port
from matrix_api import Api, cluster_route
from redis_server import RedisServer
from repl import WireTap
from test_cluster import PERSISTERS, cluster_config, new_user, rooms_on_each_persister
from twisted.internet import threads

pytestmark = pytest.mark.cluster

EVENTS_WRITER = 'synrepl_stream_position{stream="events"}'


class Prometheus:
    """A Prometheus server scraping one target every second."""

    def __init__(self, directory: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus (Debian's package) is not installed; .ci/run installs it")
        self.port = free_port()
        config = directory / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "synrepl", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.log = directory / "prometheus.log"
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )

    def query(self, promql: str) -> dict[str, float]:
        """An instant query: value per ``writer`` label."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return {r["metric"].get("writer", ""): float(r["value"][1]) for r in body["data"]["result"]}

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()


@pytest.fixture
def exporter(cluster: Deployment, tmp_path: Path) -> Iterator[tuple[str, Prometheus]]:
    listen = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "exporter.log").open("wb")
    argv = ["exporter", "-c", str(cluster.shared_config), "--listen", listen]
    process = subprocess.Popen(
        [sys.executable, "-m", "synrepl", *argv],
        stdout=log,
        stderr=log,
    )
    prometheus = Prometheus(tmp_path, listen)
    try:
        yield listen, prometheus
    finally:
        prometheus.stop()
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0, (tmp_path / "exporter.log").read_text()


def announced(tap: WireTap, stream: str) -> dict[str, int]:
    """Per writer, the token of its last RDATA or POSITION of ``stream`` on the wire."""
    return {w: token for (s, w), token in tap.announced().items() if s == stream}


async def query_until(
    prometheus: Prometheus, promql: str, wanted: Any, what: str
) -> dict[str, float]:
    return await poll_until(
        lambda: threads.deferToThread(prometheus.query, promql), wanted, what, 30, 0.5
    )


@pytest_twisted.ensureDeferred
async def test_prometheus_scrapes_positions_and_the_lag_of_a_stopped_writer(
    cluster: Deployment, cluster_redis: RedisServer, exporter: tuple[str, Prometheus]
) -> None:
    _, prometheus = exporter
    tap = WireTap(cluster_redis.port, cluster.server_name).start()
    api = Api(cluster_route(cluster.client_urls))
    try:
        alice = await new_user(api, "metrics")
        rooms = await rooms_on_each_persister(alice, cluster_config(cluster), per_persister=1)
        for n in range(3):
            for persister in PERSISTERS:
                await alice.message(rooms[persister][0], f"scraped {n}")

        def as_on_the_wire(got: dict[str, float]) -> bool:
            wire = announced(tap, "events")
            return set(PERSISTERS) <= set(wire) and all(got.get(w) == wire[w] for w in PERSISTERS)

        await query_until(prometheus, EVENTS_WRITER, as_on_the_wire, "positions as announced")

        stopped = cluster.processes["persister1"]
        assert stopped.pid is not None
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            lag = 'synrepl_stream_writer_lag_tokens{stream="events"}'
            age = 'synrepl_stream_writer_last_heard_age_seconds{stream="events"}'
            before = await threads.deferToThread(prometheus.query, lag)
            heard_before = await threads.deferToThread(prometheus.query, age)
            for n in range(5):
                await alice.message(rooms["persister2"][0], f"while persister1 is stopped {n}")
            await query_until(
                prometheus,
                lag,
                lambda got: got.get("persister1", 0) >= before.get("persister1", 0) + 5,
                "persister1's lag in tokens grows",
            )
            await query_until(
                prometheus,
                age,
                lambda got: got.get("persister1", 0) >= heard_before.get("persister1", 0) + 3,
                "seconds since persister1 was heard grow",
            )
            after = await threads.deferToThread(prometheus.query, lag)
            assert after.get("persister2") == 0
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
    finally:
        tap.stop()
        await api.close()
