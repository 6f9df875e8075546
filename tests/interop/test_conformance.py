"""``synrepl conformance`` at a real Synapse generic_worker: it must pass.

The worker is one more process of the cluster (its database, its shared
configuration) whose worker file points it at a redis-server of its own, so
the check sees it alone.  The check starts first, as a user would run it;
the worker starts after it, and a user syncs on it (USER_SYNC, USER_IP).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import yaml
from harness import Deployment, SynapseProcess, _listener, _log_config, free_port, release_facts
from matrix_api import Api, cluster_route
from redis_server import RedisServer
from test_cli import sleep
from test_cluster import new_user

pytestmark = pytest.mark.cluster


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


def conformance_worker(cluster: Deployment, redis_port: int) -> SynapseProcess:
    """A generic_worker serving the client API, on ``redis_port``."""
    name, port = "conform1", free_port()
    directory = cluster.directory
    _log_config(directory / f"{name}.log.yaml", directory / f"{name}.log")
    worker = directory / f"{name}.yaml"
    worker.write_text(
        yaml.safe_dump(
            {
                "worker_app": "synapse.app.generic_worker",
                "worker_name": name,
                "worker_listeners": [_listener(port, ["client"])],
                "worker_log_config": str(directory / f"{name}.log.yaml"),
                "worker_pid_file": str(directory / f"{name}.pid"),
                "redis": {"enabled": True, "host": "127.0.0.1", "port": redis_port},
            }
        )
    )
    return SynapseProcess(
        name, "synapse.app.generic_worker", [cluster.shared_config, worker], port, directory
    )


def start_check(out: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "synrepl", "conformance", "--json", "--wait", "90", *args],
        stdout=out.open("w"),
        stderr=out.with_suffix(".err").open("w"),
    )


@pytest_twisted.ensureDeferred
async def test_a_synapse_generic_worker_conforms(
    cluster: Deployment, own_redis: RedisServer, tmp_path: Path
) -> None:
    worker = conformance_worker(cluster, own_redis.port)
    out = tmp_path / "conformance.json"
    release = str(release_facts().release)
    check = start_check(
        out,
        "-c",
        str(cluster.shared_config),
        "-c",
        str(worker.config_files[1]),
        "--release",
        release,
    )
    api = Api(cluster_route({"master": f"http://127.0.0.1:{worker.health_port}"}))
    try:
        # Every other client of the Redis counts as the worker's: this one goes.
        with own_redis.client(register=False) as client:
            for _ in range(300):
                if any(c["cmd"] == "monitor" for c in client.client_list()):
                    break
                await sleep(0.05)
        worker.spawn()
        worker.wait_ready()
        # A user syncs on the worker: USER_SYNC start (and USER_IP).
        main_api = Api(cluster_route(cluster.client_urls))
        try:
            alice = await new_user(main_api, "conform")
        finally:
            await main_api.close()
        await api.request(
            "GET",
            "/_matrix/client/v3/sync",
            token=alice.access_token,
            params={"timeout": "0", "set_presence": "online"},
        )
        for _ in range(1200):
            if check.poll() is not None:
                break
            await sleep(0.1)
        else:
            check.kill()
            raise AssertionError("the check did not finish")
    finally:
        await api.close()
        worker.stop()
    err = out.with_suffix(".err").read_text()
    assert check.returncode == 0, (out.read_text(), err, worker.log_tail())
    report = json.loads(out.read_text())
    status = {r["rule"]: r["status"] for r in report["rules"]}
    must_pass = {
        "replicate-after-subscribe",
        "replicate-on-subscribe",
        "resubscribes",
        "well-formed",
        "worker-commands",
        "survives-garbage",
        "user-sync-pairing",
    }
    assert {rule for rule in must_pass if status[rule] == "passed"} == must_pass, report
    # A client-serving worker sends no FEDERATION_ACK: that rule is untested.
    assert status["federation-ack-not-ahead"] == "not exercised"
