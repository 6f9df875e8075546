"""``synrepl audit`` as a subprocess against real Redis and the simulated
homeserver, whose writers can persist rows without publishing them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted
import redis
from client_helpers import unique_server_name, wait_until
from redis_server import free_port
from test_cli_support import kill_leftover_clis, start_cli, write_config
from twisted.internet import reactor

from synrepl.commands import PositionCommand, encode
from synrepl.streams import EventRow, TypingRow
from synrepl.testing.homeserver import FakeHomeserver

__all__ = ("kill_leftover_clis",)


def ev(n: int) -> EventRow:
    return EventRow(f"$e{n}", "!r:test", "m.room.message", None, None, None, None, False, False)


async def cluster(tmp_path: Path) -> tuple[FakeHomeserver, Path]:
    hs = FakeHomeserver(reactor, server_name=unique_server_name(), writers=("master", "persister1"))
    await hs.start()
    hs.write("events", [ev(0)], writer="persister1")
    hs.write("typing", [TypingRow("!r:test", ())], writer="master")
    config = write_config(
        tmp_path / "homeserver.yaml", hs, stream_writers={"events": ["persister1"]}
    )
    return hs, config


def subscribers(channel: str) -> int:
    """Connections subscribed to ``channel`` (the homeserver is one)."""
    with redis.Redis(host="127.0.0.1", port=6379) as client:
        ((_, count),) = client.pubsub_numsub(channel)
    return int(count)


async def audit_started(hs: FakeHomeserver, *args: str) -> object:
    """Start the audit and wait for its REPLICATE (it watches from then on)."""
    seen = hs.replicates_seen
    cli = start_cli("audit", *args)
    await wait_until(lambda: hs.replicates_seen > seen or cli.code is not None, what="REPLICATE")
    return cli


@pytest_twisted.ensureDeferred
async def test_audit_names_every_row_written_and_not_published(tmp_path: Path) -> None:
    """On persister1: a row dropped on the wire (no POSITION covers it) and
    two rows a POSITION stepped over; on master, typing rows of which none came
    on the channel.  The audit names exactly those, and exits 3."""
    hs, config = await cluster(tmp_path)
    cli = await audit_started(hs, "-c", str(config), "--window", "2", "--grace", "1", "--json")

    def skip_over(stream: str, writer: str, prev: int, new: int) -> None:
        """What Synapse #19795 did: a POSITION saying nothing was written."""
        hs.publish_raw(encode(PositionCommand(stream, writer, prev, new)))

    try:
        hs.write("events", [ev(1)], writer="persister1")
        hs.faults("persister1").drop = 1
        dropped = hs.write("events", [ev(2)], writer="persister1")
        hs.write("events", [ev(3), ev(4)], writer="persister1")
        skipped = [hs.write_silently("events", [ev(n)], writer="persister1") for n in (5, 6)]
        skip_over("events", "persister1", skipped[0] - 1, skipped[-1])
        silent = [
            hs.write_silently("typing", [TypingRow("!r:test", (f"@u{n}:test",))], writer="master")
            for n in range(3)
        ]
        skip_over("typing", "master", silent[0] - 1, silent[-1])
        assert await cli.wait() == 3, cli.stderr
    finally:
        await hs.stop()
    report = json.loads(cli.stdout)
    lost = [
        (x["stream"], x["writer"], x["token"], x["skipped_by_position"]) for x in report["lost"]
    ]
    events_position = [skipped[0] - 1, skipped[-1]]
    typing_position = [silent[0] - 1, silent[-1]]
    assert lost == [
        ("events", "persister1", dropped, None),
        *[("events", "persister1", t, events_position) for t in skipped],
        *[("typing", "master", t, typing_position) for t in silent],
    ]
    assert report["lost"][0]["row"]["event_id"] == "$e2"
    assert report["skipping_positions"] == [
        {
            "stream": "events",
            "writer": "persister1",
            "prev": skipped[0] - 1,
            "new": skipped[-1],
            "tokens": skipped,
        },
        {
            "stream": "typing",
            "writer": "master",
            "prev": silent[0] - 1,
            "new": silent[-1],
            "tokens": silent,
        },
    ]
    assert [(s["stream"], s["writer"], s["rows_in_history"]) for s in report["silent"]] == [
        ("typing", "master", 3)
    ]
    assert report["ok"] is False and report["unchecked"] == []


@pytest_twisted.ensureDeferred
async def test_audit_of_a_healthy_cluster_is_green_and_says_what_it_checked(
    tmp_path: Path,
) -> None:
    hs, config = await cluster(tmp_path)
    cli = await audit_started(hs, "-c", str(config), "--window", "2", "--grace", "1")
    try:
        for n in range(1, 6):
            hs.write("events", [ev(n), ev(n + 100)], writer="persister1")
        hs.write("typing", [[1, 2]], writer="master")  # a row synrepl cannot type: compared raw
        assert await cli.wait() == 0, cli.stderr
    finally:
        await hs.stop()
    assert "✓ nothing lost: all 11 rows in the writers' histories came as RDATA" in cli.stdout
    assert "! 1 RDATA/POSITION line(s) did not parse" in cli.stdout
    [line] = [line for line in cli.stdout.splitlines() if line.lstrip().startswith("events")]
    assert line.split()[1:] == ["persister1", "(1,", f"{hs.token('events')}]", "10", "10", "0"]
    [line] = [line for line in cli.stdout.splitlines() if line.lstrip().startswith("typing")]
    assert line.split()[-3:] == ["1", "1", "0"]  # its row did not type, and was compared raw


@pytest_twisted.ensureDeferred
async def test_a_writer_whose_history_cannot_be_read_is_not_checked_and_exits_1(
    tmp_path: Path,
) -> None:
    hs, _ = await cluster(tmp_path)
    config_data = hs.config_dict()
    config_data["instance_map"]["persister1"] = {"host": "127.0.0.1", "port": free_port()}
    config = write_config(
        tmp_path / "broken.yaml",
        hs,
        instance_map=config_data["instance_map"],
        stream_writers={"events": ["persister1"]},
    )
    cli = await audit_started(hs, "-c", str(config), "--window", "1", "--grace", "1", "--json")
    try:
        hs.write("events", [ev(1)], writer="persister1")
        hs.write("events", [ev(2)], writer="persister1")
        assert await cli.wait() == 1, cli.stderr
    finally:
        await hs.stop()
    report = json.loads(cli.stdout)
    [unchecked] = report["unchecked"]
    assert (unchecked["stream"], unchecked["writer"]) == ("events", "persister1")
    assert "cannot connect to persister1" in unchecked["problem"]
    assert report["lost"] == []


@pytest_twisted.ensureDeferred
async def test_read_only_audit_publishes_nothing_and_starts_at_each_first_token(
    tmp_path: Path,
) -> None:
    hs, config = await cluster(tmp_path)
    seen = hs.replicates_seen
    cli = start_cli(
        "audit", "-c", str(config), "--no-replicate", "--window", "3", "--grace", "1", "--json"
    )
    try:
        await wait_until(
            lambda: cli.code is not None or subscribers(hs.server_name) > 1, what="subscribed"
        )
        first = hs.write("events", [ev(1)], writer="persister1")
        hs.faults("persister1").drop = 1
        dropped = hs.write("events", [ev(2)], writer="persister1")
        last = hs.write("events", [ev(3)], writer="persister1")
        assert await cli.wait() == 3, cli.stderr
    finally:
        await hs.stop()
    report = json.loads(cli.stdout)
    assert hs.replicates_seen == seen
    assert [(r["stream"], r["after"], r["upto"]) for r in report["ranges"]] == [
        ("events", first, last)
    ]
    assert [x["token"] for x in report["lost"]] == [dropped]
