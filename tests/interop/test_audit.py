"""``synrepl audit`` on the real multi-writer cluster.

Green when it watches the cluster's own Redis while every kind of traffic
flows; red, naming exactly the rows, when it watches through a relay that
drops chosen RDATA lines between Synapse and the audit: each dropped
message's row on its persister, and a typing stream of which no line came.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness import Deployment, subscribers
from matrix_api import Api, cluster_route
from redis_server import RedisServer
from relay import FilteringRelay
from test_cli import sleep
from test_cluster import PERSISTERS, cluster_config, new_user, rooms_on_each_persister

pytestmark = pytest.mark.cluster

WINDOW = "12"


class Audit:
    """``synrepl audit`` running in the background, polled from the reactor."""

    def __init__(self, out: Path, *args: str) -> None:
        self.out = out
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "synrepl", "audit", "--window", WINDOW, "--grace", "3", *args],
            stdout=out.open("w"),
            stderr=out.with_suffix(".err").open("w"),
        )

    async def result(self, timeout: float = 90) -> int:
        for _ in range(int(timeout * 10)):
            if self._proc.poll() is not None:
                return self._proc.returncode
            await sleep(0.1)
        self._proc.kill()
        raise AssertionError(f"audit did not finish: {self.out.with_suffix('.err').read_text()}")

    def report(self) -> dict[str, Any]:
        return json.loads(self.out.read_text())  # type: ignore[no-any-return]

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()


async def until_subscribed(port: int, channel: str, count: int) -> None:
    for _ in range(300):
        if subscribers(port, channel) >= count:
            return
        await sleep(0.05)
    raise AssertionError(f"fewer than {count} subscribers on {channel}")


async def traffic(cluster: Deployment, name: str) -> dict[str, Any]:
    """Messages on both persisters, typing, a receipt, to-device, account data."""
    api = Api(cluster_route(cluster.client_urls))
    alice = await new_user(api, name)
    rooms = await rooms_on_each_persister(alice, cluster_config(cluster), per_persister=2)
    sent: dict[str, list[str]] = {}
    for n in range(3):
        for persister in PERSISTERS:
            for room in rooms[persister]:
                sent.setdefault(room, []).append(await alice.message(room, f"audited {n}"))
    first = rooms[PERSISTERS[0]][0]
    await alice.typing(first, True)
    await alice.receipt(first, sent[first][-1])
    await alice.send_to_device("m.audit", {alice.user_id: {"*": {"n": 1}}})
    await alice.set_account_data("m.audit", {"n": 1})
    return {"rooms": rooms, "sent": sent}


@pytest.fixture
def audits() -> Iterator[list[Audit]]:
    started: list[Audit] = []
    yield started
    for audit in started:
        audit.kill()


@pytest_twisted.ensureDeferred
async def test_audit_of_the_healthy_cluster_finds_nothing_lost(
    cluster: Deployment, cluster_redis: RedisServer, tmp_path: Path, audits: list[Audit]
) -> None:
    before = subscribers(cluster_redis.port, cluster.server_name)
    config = ("-c", str(cluster.shared_config))
    audit = Audit(tmp_path / "audit.json", *config, "--json")
    as_text = Audit(tmp_path / "audit.txt", *config, "--color", "never")
    audits.extend((audit, as_text))
    await until_subscribed(cluster_redis.port, cluster.server_name, before + 2)
    await sleep(1)  # the writers' answers to its REPLICATE: the start tokens
    await traffic(cluster, "healthy")
    assert await audit.result() == 0, audit.out.with_suffix(".err").read_text()
    assert await as_text.result() == 0, as_text.out.with_suffix(".err").read_text()
    text = as_text.out.read_text()
    print(text)
    assert "✓ nothing lost: all " in text and "✗" not in text
    report = audit.report()
    assert report["ok"] and report["lost"] == [] and report["silent"] == []
    checked = {(r["stream"], r["writer"]) for r in report["ranges"]}
    for persister in PERSISTERS:
        assert ("events", persister) in checked
    assert {("typing", "typing1"), ("receipts", "writer1"), ("to_device", "writer1")} <= checked
    events = [r for r in report["ranges"] if r["stream"] == "events"]
    assert sum(r["rows_in_history"] for r in events) >= 12  # 3 messages x 4 rooms, and more
    assert report["unheard"] == [] and report["unchecked"] == []


@pytest_twisted.ensureDeferred
async def test_audit_through_a_filtering_relay_names_exactly_the_dropped_rows(
    cluster: Deployment, cluster_redis: RedisServer, tmp_path: Path, audits: list[Audit]
) -> None:
    """The relay drops the RDATA of every message in one room of persister1
    and every typing line; the audit names each dropped row (stream, writer,
    token, event ID) and the typing stream as silent, and exits 3."""
    channel = cluster.server_name
    doomed: list[str] = []

    def drop(line: str) -> bool:
        if line.startswith("RDATA typing "):
            return True
        return (
            line.startswith("RDATA events persister1 ")
            and bool(doomed)
            and f'"{doomed[0]}","m.room.message"' in line
        )

    (tmp_path / "private-redis").mkdir()
    private = RedisServer(tmp_path / "private-redis")
    private.start()
    relay = FilteringRelay(cluster_redis.port, private.port, channel, drop).start()
    try:
        # A room of its own on persister1: its messages are the ones dropped.
        api = Api(cluster_route(cluster.client_urls))
        bob = await new_user(api, "dropped")
        doomed.append(
            (await rooms_on_each_persister(bob, cluster_config(cluster), 1))["persister1"][0]
        )
        common = (
            "-c",
            str(cluster.shared_config),
            "--redis-url",
            f"redis://127.0.0.1:{private.port}",
        )
        as_json = Audit(tmp_path / "audit.json", *common, "--json")
        as_text = Audit(tmp_path / "audit.txt", *common, "--color", "never")
        audits.extend((as_json, as_text))
        await until_subscribed(private.port, channel, 3)  # the relay and both audits
        await sleep(1)
        assert sum(line.startswith("REPLICATE") for line in relay.relayed_back) >= 2
        for n in range(3):
            await bob.message(doomed[0], f"never published {n}")
        await traffic(cluster, "relayed")
        assert await as_json.result() == 3, as_json.out.with_suffix(".err").read_text()
        assert await as_text.result() == 3, as_text.out.with_suffix(".err").read_text()
    finally:
        relay.stop()
        private.close()
    dropped_events = []
    dropped_typing = []
    for line in relay.dropped:
        _, stream, writer, token, row = line.split(" ", 4)
        assert token != "batch", line
        if stream == "events":
            dropped_events.append(("events", writer, int(token), json.loads(row)[1][0]))
        else:
            dropped_typing.append(("typing", writer, int(token)))
    assert len(dropped_events) == 3 and dropped_typing
    report = as_json.report()
    lost = [
        (x["stream"], x["writer"], x["token"], x["row"].get("event_id")) for x in report["lost"]
    ]
    assert [x for x in lost if x[0] == "events"] == dropped_events
    lost_typing = [x[:3] for x in lost if x[0] == "typing"]
    # The typing writer keeps one row per room (the newest): a token dropped
    # and then replaced by a newer one for the same room is not in its history.
    assert lost_typing and set(lost_typing) <= set(dropped_typing)
    assert [(s["stream"], s["writer"]) for s in report["silent"]] == [("typing", "typing1")]
    assert all(x["skipped_by_position"] is None for x in report["lost"])
    text = as_text.out.read_text()
    print(text)
    for _, writer, token, event_id in dropped_events:
        assert f"✗ lost: events {writer} token {token}: never published as RDATA" in text
        assert event_id in text
    assert "✗ silent: typing from typing1" in text
