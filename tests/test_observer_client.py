"""The observer features of ReplicationClient on real Redis, with the simulated homeserver.

The FakeHomeserver, like a quiet Synapse, sends POSITION only when someone
sends REPLICATE, so a read-only client here is on its own: it must connect
each writer from its RDATA.  Stores are real files; the event source is an
in-memory one that behaves like the database sources where it matters
(batched fetches, events not yet visible, the source being down).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from client_helpers import Adapter, Collector, event, homeserver, sleep, wait_until
from twisted.internet import defer

from synrepl import _json
from synrepl.checkpoints import FileCheckpointStore
from synrepl.deadletters import FileDeadLetterStore
from synrepl.delivery import HandlerFailurePolicy
from synrepl.events import (
    EventFetchPolicy,
    EventFilter,
    EventSourceUnavailable,
    EventsReceived,
    FullEvent,
    MissingEvent,
)
from synrepl.positions import RowsReceived
from synrepl.twisted.client import DeliveryStoppedError, NotReadyError


class MemorySource:
    """Full events by id, as a database source answers them (batched)."""

    def __init__(self) -> None:
        self.events: dict[str, FullEvent] = {}
        self.fetches: list[tuple[str, ...]] = []
        self.down = False
        self.seed: dict[str, dict[str, int]] = {}

    def add(self, n: int, sender: str, room: str = "!room:test") -> None:
        self.events[f"$e{n}"] = FullEvent(
            event_id=f"$e{n}",
            room_id=room,
            type="m.room.message",
            sender=sender,
            content={"msgtype": "m.text", "body": f"message {n}"},
        )

    def fetch(self, event_ids: Sequence[str]) -> dict[str, FullEvent]:
        self.fetches.append(tuple(event_ids))
        if self.down:
            raise EventSourceUnavailable("the database is down")
        return {i: self.events[i] for i in event_ids if i in self.events}

    def positions(self) -> dict[str, dict[str, int]]:
        return self.seed

    def close(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_read_only_alone_connects_from_rdata_and_gets_the_whole_first_token(
    adapter: Adapter,
) -> None:
    """Nobody sends REPLICATE: the first RDATA connects the writer, its token is
    fetched whole although its batch began before the client listened, and every
    later token arrives; nothing is published."""
    hs = await homeserver()
    hs.write("events", [event(0)])
    token = hs.write_silently("events", [event(1), event(2), event(3)])
    rows = [_json.dumps(e.to_raw()) for e in (event(1), event(2), event(3))]
    await hs.publish_raw(f"RDATA events master batch {rows[0]}")  # before the client listens
    client = adapter.client(hs, read_only=True)
    seen = Collector()
    client.on_rows("events", seen)
    await client.start()
    await hs.publish_raw(f"RDATA events master batch {rows[1]}")
    await hs.publish_raw(f"RDATA events master {token} {rows[2]}")
    later = hs.write("events", [event(4)])
    await wait_until(lambda: client.positions().get("events", {}).get("master") == later)
    assert seen.rows("events", "master") == [(t, r) for t, r in hs.history("events") if t >= token]
    assert [b.fetched for b in seen.batches] == [True, False]
    assert hs.replicates_seen == 0
    assert client.counters.wire.rdata_connects == 1
    await client.stop()
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_readiness_names_silent_writers_and_seeds_make_ready_at_once(
    adapter: Adapter,
) -> None:
    """wait_ready fails naming a silent writer; its first row makes the client
    ready; a seed from the database makes a new client ready before any traffic."""
    hs = await homeserver(writers=("master", "persister1"))
    client = adapter.client(hs, read_only=True, streams={"events"})
    await client.start()
    with pytest.raises(NotReadyError) as info:
        await client.wait_ready(timeout=0.3)
    assert info.value.silent == {"events": ["persister1"]}
    assert client.silent_writers() == {"events": ["persister1"]}
    ready = client.wait_ready(timeout=10)
    hs.write("events", [event(1)], writer="persister1")
    await ready
    assert client.ready
    await client.stop()

    source = MemorySource()
    source.seed = {"events": {"persister1": 40}}
    seeded = adapter.client(hs, read_only=True, streams={"events"}, seed_from=source)
    await seeded.start()
    await seeded.wait_ready(timeout=1)
    assert seeded.positions() == {"events": {"persister1": 40}}
    await seeded.stop()
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_checkpoint_store_resumes_exactly_once_across_a_clean_stop(
    tmp_path: Path, adapter: Adapter
) -> None:
    """With a checkpoint store the client saves after each handled batch and a
    restart resumes there: rows written while it was down arrive once."""
    hs = await homeserver(writers=("master", "persister1"))
    hs.write("events", [event(0)], writer="persister1")
    path = tmp_path / "observer.checkpoint"

    def store() -> FileCheckpointStore:
        return FileCheckpointStore(path, server_name=hs.server_name)

    first = adapter.client(hs, read_only=True, streams={"events"}, checkpoint=store())
    seen = Collector()
    first.on_rows("events", seen)
    await first.start()
    tokens = [hs.write("events", [event(n)], writer="persister1") for n in range(1, 4)]
    await wait_until(lambda: store().load() == {"events": {"persister1": tokens[-1]}})
    await first.stop()
    for n in range(4, 8):
        tokens.append(hs.write("events", [event(n)], writer="persister1"))
    second = adapter.client(hs, read_only=True, streams={"events"}, checkpoint=store())
    second.on_rows("events", seen)
    await second.start()
    tokens.append(hs.write("events", [event(8)], writer="persister1"))
    await wait_until(lambda: second.positions() == {"events": {"persister1": tokens[-1]}})
    assert [t for t, _ in seen.rows("events", "persister1")] == tokens
    await second.stop()
    assert store().load() == {"events": {"persister1": tokens[-1]}}
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_a_failing_batch_is_retried_then_dead_lettered(
    tmp_path: Path, adapter: Adapter
) -> None:
    """The handler fails on one token: it is run again after a delay, then kept
    in the dead-letter store; later rows still arrive and the position moves on."""
    hs = await homeserver()
    hs.write("events", [event(0)])
    letters = FileDeadLetterStore(tmp_path / "dead.jsonl", server_name=hs.server_name)
    client = adapter.client(
        hs,
        read_only=True,
        dead_letters=letters,
        failure_policy=HandlerFailurePolicy(retries=2, base_delay=0.05, then="dead_letter"),
    )
    calls: list[int] = []
    bad = hs.token("events") + 2

    def handler(batch: RowsReceived) -> None:
        calls.append(batch.token)
        if batch.token == bad:
            raise RuntimeError("cannot deliver this one")

    client.on_rows("events", handler)
    await client.start()
    tokens = [hs.write("events", [event(n)]) for n in range(1, 5)]
    await wait_until(lambda: client.positions().get("events", {}).get("master") == tokens[-1])
    assert calls.count(bad) == 3
    stored = FileDeadLetterStore(tmp_path / "dead.jsonl", server_name=hs.server_name).letters()
    assert [(d.stream, d.token, d.attempts) for d in stored] == [("events", bad, 3)]
    assert list(stored[0].rows) == [r for t, r in hs.history("events") if t == bad]
    assert "cannot deliver this one" in stored[0].error
    assert client.counters.dead_letters == 1 and client.counters.handler_retries == 2
    await client.stop()
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_a_batch_nothing_may_take_stops_the_client_before_it(adapter: Adapter) -> None:
    """then="stop": the client stops loudly and its position stays before the batch."""
    hs = await homeserver()
    hs.write("events", [event(0)])
    client = adapter.client(
        hs, read_only=True, failure_policy=HandlerFailurePolicy(retries=1, base_delay=0.05)
    )
    bad = hs.token("events") + 2

    def handler(batch: RowsReceived) -> None:
        if batch.token == bad:
            raise RuntimeError("no")

    client.on_rows("events", handler)
    await client.start()
    for n in range(1, 5):
        hs.write("events", [event(n)])
    with pytest.raises(DeliveryStoppedError, match="failed 2 times"):
        await client.finished()
    assert client.positions()["events"]["master"] == bad - 1
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_full_events_are_filtered_fetched_in_batches_and_never_skipped(
    adapter: Adapter,
) -> None:
    """on_events: room and type filters decide before any fetch; the sender filter
    on the fetched event; an event not yet visible is retried, then passed on as
    missing; while the source is down the position waits, then moves on."""
    hs = await homeserver()
    hs.write("events", [event(0)])
    source = MemorySource()
    client = adapter.client(hs, read_only=True)
    got: list[EventsReceived] = []
    client.on_events(
        got.append,
        source=source,
        filter=EventFilter(rooms=["!room:test"], senders=["@alice:test"]),
        policy=EventFetchPolicy(missing_attempts=2, missing_delay=0.05),
    )
    await client.start()
    source.add(1, "@alice:test")
    source.add(2, "@bob:test")
    hs.write("events", [event(1), event(2)])  # one token, two events: one fetch
    third = hs.write("events", [event(3, room="!other:test")])  # refused by its row
    await wait_until(lambda: client.positions().get("events", {}).get("master") == third)
    assert [[e.event_id for e in b.events] for b in got] == [["$e1"]]
    assert source.fetches == [("$e1", "$e2")]

    missing = hs.write("events", [event(4)])  # never visible to the source
    await wait_until(lambda: len(got) == 2)
    (gone,) = got[1].events
    assert isinstance(gone, MissingEvent) and gone.event_id == "$e4"
    assert client.counters.events_missing == 1

    source.down = True
    source.add(5, "@alice:test")
    later = hs.write("events", [event(5)])
    await sleep(0.5)
    assert client.positions()["events"]["master"] == missing  # waits for the source
    source.down = False
    await wait_until(lambda: client.positions()["events"]["master"] == later, timeout=20)
    assert [e.event_id for e in got[2].events] == ["$e5"]
    assert client.counters.event_source_failures >= 1
    await client.stop()
    await hs.stop()


@pytest_twisted.ensureDeferred
async def test_stop_lets_the_running_batch_finish_and_saves(
    tmp_path: Path, adapter: Adapter
) -> None:
    """A clean stop waits for the batch with the handler and saves the checkpoint
    that includes it, so a restart repeats nothing."""
    hs = await homeserver()
    hs.write("events", [event(0)])
    path = tmp_path / "cp"
    client = adapter.client(
        hs,
        read_only=True,
        checkpoint=FileCheckpointStore(path, server_name=hs.server_name),
    )
    gate = adapter.gate()
    started: list[int] = []

    def handler(batch: RowsReceived) -> Any:
        started.append(batch.token)
        return gate.awaitable

    client.on_rows("events", handler)
    await client.start()
    token = hs.write("events", [event(1)])
    await wait_until(lambda: started == [token])
    stopping = defer.ensureDeferred(client.stop())
    await sleep(0.1)
    assert not stopping.called
    gate.open()
    await stopping
    saved = FileCheckpointStore(path, server_name=hs.server_name).load()
    assert saved == {"events": {"master": token}}
    await hs.stop()
