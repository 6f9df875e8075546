"""``synrepl doctor`` as a subprocess against real Redis and the simulated
homeserver: all green, then one deliberate fault at a time, each reported
on its own line with its fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
import yaml
from client_helpers import unique_server_name
from redis_server import free_port
from test_cli_support import Cli, kill_leftover_clis, start_cli, write_config
from twisted.internet import reactor

from synrepl.streams import EventRow, TypingRow
from synrepl.testing.homeserver import FakeHomeserver

__all__ = ("kill_leftover_clis",)


def ev(n: int) -> EventRow:
    return EventRow(f"$e{n}", "!r:test", "m.room.message", None, None, None, None, False, False)


async def homeserver() -> FakeHomeserver:
    hs = FakeHomeserver(reactor, server_name=unique_server_name(), writers=("master", "persister1"))
    await hs.start()
    hs.write("typing", [TypingRow("!r:test", ())], writer="master")
    hs.write("events", [ev(1)], writer="persister1")
    return hs


def doctor(config: Path, *extra: str) -> Cli:
    return start_cli("doctor", "-c", str(config), "--listen", "1", "--http-timeout", "3", *extra)


def failures(cli: Cli) -> list[str]:
    return [line for line in cli.stdout.splitlines() if line.startswith("[FAIL]")]


def fix_after(cli: Cli, failure: str) -> str:
    lines = cli.stdout.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("[FAIL]") and failure in line)
    assert lines[index + 1].startswith("    fix: "), lines[index : index + 2]
    return lines[index + 1]


@pytest_twisted.ensureDeferred
async def test_doctor_all_green_on_a_consistent_deployment(tmp_path: Path) -> None:
    """Config, Redis, traffic, every instance answering REPLICATE and HTTP with
    the secret accepted: exit 0, no failure; plain ASCII marks when stdout is
    not a terminal.  A worker file that agrees with the shared one is fine."""
    hs = await homeserver()
    config = write_config(tmp_path / "homeserver.yaml", hs)
    worker = tmp_path / "persister1.yaml"
    worker.write_text(
        yaml.safe_dump(
            {
                "worker_app": "synapse.app.generic_worker",
                "worker_name": "persister1",
                "worker_listeners": [
                    {
                        "port": hs.http_port("persister1"),
                        "type": "http",
                        "resources": [{"names": ["replication"]}],
                    }
                ],
            }
        )
    )
    try:
        cli = doctor(config, "--worker", str(worker))
        assert await cli.wait() == 0, cli.stdout + cli.stderr
    finally:
        await hs.stop()
    out = cli.stdout
    assert failures(cli) == []
    assert "✓" not in out  # ASCII when not a terminal
    for expected in (
        "[ok]   config: loaded",
        "[ok]   Redis 127.0.0.1:6379: connected",
        "[ok]   traffic:",
        "[ok]   main is on the channel (answered REPLICATE)",
        "[ok]   persister1 is on the channel (answered REPLICATE)",
        "[ok]   main: instance_map",
        "[ok]   worker 'persister1'",
        "[ok]   persister1: instance_map",
        "replication listener answers, secret accepted",
        "cannot tell its Synapse version (Server: TwistedWeb",
    ):
        assert expected in out, expected
    assert out.rstrip().endswith("all checks passed, 2 warnings")


@pytest_twisted.ensureDeferred
async def test_doctor_reports_each_fault_with_its_fix(tmp_path: Path) -> None:
    """A stream writer missing from instance_map, an unreachable Redis, a wrong
    secret, an unreachable listener, a listener on another port than
    instance_map says: each a [FAIL] line and a fix, exit status 1."""
    hs = await homeserver()
    base = hs.config_dict()

    def variant(name: str, **changes: Any) -> Path:
        return write_config(tmp_path / f"{name}.yaml", hs, **changes)

    closed = free_port()
    broken_map = {**base["instance_map"], "persister1": {"host": "127.0.0.1", "port": closed}}
    runs = {
        "writer": doctor(variant("writer", stream_writers={"events": ["persister1", "ghost"]})),
        "redis": doctor(variant("redis", redis={"enabled": True, "port": free_port()})),
        "secret": doctor(variant("secret", worker_replication_secret="wrong")),
        "listener": doctor(variant("listener", instance_map=broken_map)),
        "port": doctor(
            variant(
                "port",
                listeners=[
                    {"port": closed, "type": "http", "resources": [{"names": ["replication"]}]}
                ],
            )
        ),
    }
    try:
        for name, cli in runs.items():
            assert await cli.wait() == 1, (name, cli.stdout, cli.stderr)
            assert "Traceback" not in cli.stdout + cli.stderr
            assert failures(cli), (name, cli.stdout)
            assert "problem" in cli.stdout.splitlines()[-1]
    finally:
        await hs.stop()

    writer = runs["writer"]
    assert failures(writer) == [
        "[FAIL] config: stream_writers.events: writer 'ghost' is not in instance_map"
    ]
    assert fix_after(writer, "ghost") == (
        "    fix: add instance_map.ghost with host and port, or path"
    )

    redis = runs["redis"]
    assert "connection refused" in failures(redis)[0]
    assert "is redis-server running there?" in fix_after(redis, "Redis")
    assert "[skip] traffic: needs Redis" in redis.stdout
    assert "[ok]   main at http://" in redis.stdout  # the other checks still run

    secret = runs["secret"]
    assert len(failures(secret)) == 2  # both instances refuse it
    assert "either it refused the replication secret" in failures(secret)[0]
    assert "same worker_replication_secret" in fix_after(secret, "answered HTTP 500")

    listener = runs["listener"]
    assert any(
        f"cannot connect to persister1 at http://127.0.0.1:{closed}" in line
        for line in failures(listener)
    )
    assert "is persister1 running" in fix_after(listener, "cannot connect to persister1")

    port = runs["port"]
    assert any(f"its replication listener is on port {closed}" in line for line in failures(port))


@pytest_twisted.ensureDeferred
async def test_doctor_needs_a_readable_config(tmp_path: Path) -> None:
    """No -c, or a file that cannot be read: one error line, exit status 2."""
    runs = [start_cli("doctor"), start_cli("doctor", "-c", str(tmp_path / "missing.yaml"))]
    for cli in runs:
        assert await cli.wait() == 2
        assert cli.stderr.count("synrepl: error:") == 1 and "Traceback" not in cli.stderr
