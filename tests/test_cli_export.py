"""``synrepl export`` run as users run it (a subprocess) against the simulated
homeserver on real Redis: rows and full events into a Redis stream read
back with a consumer group, a SIGKILL and a restart (at-least-once, duplicates
with the same id), a Redis sink stopped and started again, partitions whose
union is the traffic, and a change of partition count by handover.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_twisted
import redis as redis_py
from client_helpers import sleep, unique_server_name, wait_until
from redis_server import RedisServer, redis_server_available
from test_cli_support import (
    SynapseDb,
    kill_leftover_clis,
    start_cli,
    write_config,
    write_event,
)
from twisted.internet import reactor

from synrepl.testing.homeserver import FakeHomeserver

__all__ = ("kill_leftover_clis",)


async def homeserver(**kwargs: Any) -> FakeHomeserver:
    hs = FakeHomeserver(reactor, server_name=unique_server_name(), **kwargs)
    await hs.start()
    return hs


def read_group(r: redis_py.Redis, key: str, group: str = "test") -> list[dict[str, Any]]:
    """Every entry of ``key``, read (and acknowledged) through a consumer group."""
    try:
        r.xgroup_create(key, group, id="0", mkstream=True)
    except redis_py.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    out = []
    while True:
        got = r.xreadgroup(group, "reader", {key: ">"}, count=1000)
        if not got:
            return out
        for entry_id, fields in got[0][1]:
            message = json.loads(fields[b"data"])
            assert fields[b"id"].decode() == message["id"]
            out.append(message)
            r.xack(key, group, entry_id)


def database_config(tmp_path: Path, hs: FakeHomeserver, db: SynapseDb) -> str:
    database = {"name": "sqlite3", "args": {"database": str(db.path)}}
    return str(write_config(tmp_path / "homeserver.yaml", hs, database=database))


@pytest_twisted.ensureDeferred
async def test_export_full_events_into_a_redis_stream(tmp_path: Path) -> None:
    """--full to redis-stream://: one entry per event with sender and content,
    in order, read back with a consumer group."""
    hs = await homeserver()
    db = SynapseDb(tmp_path / "homeserver.db")
    write_event(hs, db, "$before", "!a:test", "@alice:test", {"body": "before"})
    config = database_config(tmp_path, hs, db)
    key = f"export-{hs.server_name}"
    r = redis_py.Redis()
    cli = start_cli(
        "-vv",
        "export",
        "-c",
        config,
        "--full",
        "--to",
        f"redis-stream://127.0.0.1:6379/{key}",
        "--checkpoint",
        str(tmp_path / "export.checkpoint"),
    )
    try:
        await cli.wait_for_stderr("synrepl export:")
        for n in range(5):
            write_event(hs, db, f"$e{n}", "!a:test", "@alice:test", {"body": f"m{n}"})
        await wait_until(lambda: r.xlen(key) == 5, what=f"five entries {cli.stderr}")
    finally:
        cli.signal("INT")
        assert await cli.wait() == 0, cli.stderr
        await hs.stop()
        db.close()
    got = read_group(r, key)
    assert [(m["event_id"], m["sender"], m["content"]["body"]) for m in got] == [
        (f"$e{n}", "@alice:test", f"m{n}") for n in range(5)
    ]
    r.delete(key)


@pytest_twisted.ensureDeferred
async def test_debug_rows(tmp_path: Path) -> None:
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    key = f"export-{hs.server_name}"
    r = redis_py.Redis()
    cli = start_cli(
        "-vv",
        "export",
        "-c",
        config,
        "--stream",
        "typing",
        "--to",
        f"redis-stream://127.0.0.1:6379/{key}",
    )
    try:
        await cli.wait_for_stderr("synrepl export:")
        from synrepl.streams import TypingRow

        for n in range(5):
            hs.write("typing", [TypingRow(f"!r{n}:t", ("@a:t",))])
        await wait_until(lambda: r.xlen(key) == 5, what=f"five entries {cli.stderr}")
    finally:
        cli.signal("INT")
        assert await cli.wait() == 0, cli.stderr
        await hs.stop()
