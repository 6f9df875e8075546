"""The exporter as a library, on both clients: the asyncio ReplicationClient
(on a loop of its own) beside an AsyncioHomeserver, and the Twisted one on
the suite's asyncio reactor beside a FakeHomeserver, each exporting into a
real Redis stream, stopped and resumed from its checkpoint: every event once.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest_twisted
import redis as redis_py
from asyncio_helpers import run_in_new_loop
from client_helpers import unique_server_name, wait_until
from twisted.internet import defer, reactor

from synrepl.asyncio.client import ReplicationClient as AsyncioClient
from synrepl.checkpoints import FileCheckpointStore
from synrepl.export import Exporter
from synrepl.export.redis_stream import RedisStreamSink
from synrepl.streams import EventRow
from synrepl.testing.asyncio_homeserver import AsyncioHomeserver
from synrepl.testing.homeserver import FakeHomeserver
from synrepl.twisted.client import ReplicationClient as TwistedClient


def ev(n: int) -> EventRow:
    return EventRow(
        f"$e{n}", f"!room{n % 3}:test", "m.room.message", None, None, None, None, False, False
    )


def exported(key: str) -> list[str]:
    r = redis_py.Redis()
    ids = [json.loads(fields[b"data"])["row"]["event_id"] for _, fields in r.xrange(key)]
    r.delete(key)
    return ids


async def _until(condition: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_asyncio_client_exports_every_event_once_across_a_restart(tmp_path: Path) -> None:
    """A clean stop and a restart from the checkpoint: what was written while
    no client ran is exported at once, and nothing twice."""
    key = f"export-{unique_server_name()}"

    async def scenario() -> None:
        hs = AsyncioHomeserver(server_name=unique_server_name())
        await hs.start()
        r = redis_py.Redis()
        store_path = tmp_path / "ckpt"

        async def run(first: int, last: int) -> None:
            client = AsyncioClient(
                hs.config(),
                streams={"events"},
                fetcher=hs.fetcher(),
                checkpoint=FileCheckpointStore(store_path, server_name=hs.server_name),
            )
            exporter = Exporter(
                RedisStreamSink("redis://127.0.0.1:6379", key), server_name=hs.server_name
            )
            exporter.follow_rows(client, "events")
            await client.start()
            await client.wait_ready(10)  # a position for master: rows from here on
            for n in range(first, last + 1):
                hs.write("events", [ev(n)])
            await _until(lambda: r.xlen(key) == last)
            await client.stop()
            await exporter.close()

        await run(1, 10)
        for n in range(11, 15):  # while no client runs
            hs.write("events", [ev(n)])
        await run(15, 20)  # REPLICATE: the restart fetches 11..14 at once
        await hs.stop()

    run_in_new_loop(scenario())
    assert exported(key) == [f"$e{n}" for n in range(1, 21)]


@pytest_twisted.ensureDeferred
async def test_twisted_client_on_the_asyncio_reactor_exports_too(tmp_path: Path) -> None:
    """The Twisted client awaits the exporter's asyncio tasks (its handlers run
    as tasks, which the sinks' libraries need)."""
    hs = FakeHomeserver(reactor, server_name=unique_server_name())
    await hs.start()
    key = f"export-{hs.server_name}"
    r = redis_py.Redis()
    client = TwistedClient(
        reactor,
        hs.config(),
        streams={"events"},
        checkpoint=FileCheckpointStore(tmp_path / "ckpt", server_name=hs.server_name),
    )
    exporter = Exporter(RedisStreamSink("redis://127.0.0.1:6379", key), server_name=hs.server_name)
    exporter.follow_rows(client, "events")
    await client.start()
    await client.wait_ready(10)
    for n in range(1, 11):
        hs.write("events", [ev(n)])
    await wait_until(lambda: r.xlen(key) == 10, what="ten entries")
    await client.stop()
    await defer.Deferred.fromFuture(asyncio.ensure_future(exporter.close()))
    await hs.stop()
    assert exported(key) == [f"$e{n}" for n in range(1, 11)]
    assert exporter.stats.acknowledged == {"events": {"master": 10}}
