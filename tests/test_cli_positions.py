"""``synrepl positions`` as a subprocess against real Redis and the simulated
homeserver: the table, --json, a lagging writer and one that never answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted
from client_helpers import unique_server_name
from redis_server import free_port
from test_cli_support import kill_leftover_clis, start_cli, write_config
from twisted.internet import reactor

from synrepl.streams import EventRow, TypingRow
from synrepl.testing.homeserver import FakeHomeserver

__all__ = ("kill_leftover_clis",)


def ev(n: int) -> EventRow:
    return EventRow(f"$e{n}", "!r:test", "m.room.message", None, None, None, None, False, False)


@pytest_twisted.ensureDeferred
async def test_positions_table_and_json_flag_lagging_and_silent_writers(tmp_path: Path) -> None:
    """persister2 is 10 tokens behind persister1 on events, persister3 is
    configured but never answers: both are flagged, in the table and in
    --json, with exit status 3; the stream minimum is the lagging writer's."""
    hs = FakeHomeserver(
        reactor,
        server_name=unique_server_name(),
        writers=("master", "persister1", "persister2"),
    )
    await hs.start()
    hs.write("events", [ev(0)], writer="persister2")
    behind = hs.write("events", [ev(1)], writer="persister2")
    for n in range(2, 12):
        ahead = hs.write("events", [ev(n)], writer="persister1")
    typing = hs.write("typing", [TypingRow("!r:test", ())], writer="master")
    config_data = hs.config_dict()
    config_data["instance_map"]["persister3"] = {"host": "127.0.0.1", "port": free_port()}
    config = write_config(
        tmp_path / "homeserver.yaml",
        hs,
        instance_map=config_data["instance_map"],
        stream_writers={"events": ["persister1", "persister2", "persister3"]},
    )
    common = ("positions", "-c", str(config), "--window", "1", "--max-lag", "5")
    as_json = start_cli(*common, "--json")
    as_table = start_cli(*common)
    relaxed = start_cli(
        "positions",
        "-c",
        str(config),
        "--window",
        "1",
        "--max-lag",
        "50",
        "--stream",
        "events",
        "--json",
    )
    try:
        assert await as_json.wait() == 3, as_json.stderr
        assert await as_table.wait() == 3, as_table.stderr
        assert await relaxed.wait() == 3, relaxed.stderr
    finally:
        await hs.stop()
    report = json.loads(as_json.stdout)
    events = report["streams"]["events"]
    assert events["writers"]["persister1"] == {"token": ahead, "lag": 0, "answered": True}
    assert events["writers"]["persister2"] == {
        "token": behind,
        "lag": ahead - behind,
        "answered": True,
    }
    assert events["writers"]["persister3"] == {"token": None, "lag": None, "answered": False}
    assert events["minimum"] is None  # persister3 unknown
    assert report["streams"]["typing"]["writers"]["master"]["token"] == typing
    assert {"kind": "lag", "stream": "events", "writer": "persister2", "lag": ahead - behind} in (
        report["flags"]
    )
    assert {"kind": "silent_instance", "writer": "persister3"} in report["flags"]
    # A larger --max-lag no longer flags persister2; persister3 stays silent.
    relaxed_report = json.loads(relaxed.stdout)
    assert set(relaxed_report["streams"]) == {"events"}
    assert relaxed_report["flags"] == [{"kind": "silent_instance", "writer": "persister3"}]

    table = as_table.stdout
    assert "positions on" in table
    events_line = next(line for line in table.splitlines() if line.strip().startswith("events"))
    assert f"{behind} (-{ahead - behind})" in events_line
    assert "no answer" in events_line
    assert f"persister2 is {ahead - behind} tokens behind on events" in table
    assert "persister3 sent no POSITION at all" in table


@pytest_twisted.ensureDeferred
async def test_positions_with_nobody_answering_is_a_failure() -> None:
    """No process on the channel: one error line, exit status 1."""
    cli = start_cli("positions", "--server-name", unique_server_name(), "--window", "0.5")
    assert await cli.wait() == 1
    assert cli.stderr.startswith("synrepl: error: no POSITION within 0.5 s")
    assert "Traceback" not in cli.stderr
