"""synrepl against a real multi-writer Synapse cluster (scenarios 6, 7 and 8).

The cluster (``conftest.cluster``): a main process and four generic workers
on PostgreSQL: ``persister1`` and ``persister2`` (``stream_writers.events``),
``typing1`` (typing) and ``writer1`` (to_device, account_data, receipts,
presence).  synrepl reads the same ``homeserver.yaml`` the processes run
with.

- which instance answers REPLICATE for which stream, against synrepl's idea
  of who writes what;
- rooms sharded across the two event persisters: the writer name on every
  row, synrepl's room -> persister choice against where Synapse actually
  persisted each room (the ``events`` table), and per-writer positions and
  the per-stream minimum against the main process's own stream token;
- an event persister killed and restarted: nothing lost, nothing twice;
- Redis restarted while messages are being sent: every event the client API
  lists arrives exactly once;
- a read-only observer, watched with Redis ``MONITOR``, publishes nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from client_helpers import sleep, wait_until
from harness import Deployment, release_facts, subscribers, wait_for_subscribers
from matrix_api import Api, User, cluster_route
from redis_server import RedisServer
from repl import MonitorTap, Observation, Recorder, start_client
from twisted.internet import defer, reactor, threads

from synrepl.config import SynapseConfig, load_config
from synrepl.connection import TransportOptions
from synrepl.streams import EventRow

pytestmark = pytest.mark.cluster

PERSISTERS = ("persister1", "persister2")
INSTANCES = ("master", "persister1", "persister2", "typing1", "writer1")

#: Who answers REPLICATE for each stream in this cluster, as observed on
#: Synapse 1.163.2.  ``federation`` has no writer: the main process sends
#: federation itself, so nobody publishes that stream.
WRITERS_OF_NEWEST: dict[str, set[str]] = {
    "events": set(PERSISTERS),
    "backfill": set(PERSISTERS),
    "profile_updates": set(PERSISTERS),
    "sticky_events": set(PERSISTERS),
    "typing": {"typing1"},
    "presence": {"writer1"},
    "presence_federation": {"writer1"},
    "to_device": {"writer1"},
    "account_data": {"writer1"},
    "receipts": {"writer1"},
    "push_rules": {"master"},
    "pushers": {"master"},
    "device_lists": {"master"},
    "thread_subscriptions": {"master"},
    "un_partial_stated_room": {"master"},
    "un_partial_stated_event": {"master"},
    "quarantined_media": {"master"},
    "caches": set(INSTANCES),
}

#: The same, for the streams the release under test has.
WRITERS = {s: w for s, w in WRITERS_OF_NEWEST.items() if s in release_facts().streams}


@pytest_twisted.async_yield_fixture
async def api(cluster: Deployment) -> AsyncIterator[Api]:
    client = Api(cluster_route(cluster.client_urls))
    yield client
    await client.close()


def cluster_config(cluster: Deployment) -> SynapseConfig:
    return load_config(cluster.shared_config)


@pytest_twisted.async_yield_fixture
async def obs(
    cluster: Deployment, cluster_redis: RedisServer, adapter: str
) -> AsyncIterator[Observation]:
    observation = Observation(cluster_config(cluster), cluster_redis.port, adapter=adapter)
    await observation.start(WRITERS)
    try:
        yield observation
    finally:
        await observation.stop()


_n = itertools.count()


async def new_user(api: Api, name: str) -> User:
    return await api.register(f"{name}{next(_n)}x{time.time_ns() % 10**10}")


async def rooms_on_each_persister(
    alice: User, config: SynapseConfig, per_persister: int
) -> dict[str, list[str]]:
    """Create rooms until synrepl's sharding puts ``per_persister`` on each
    event persister (at most 40 rooms; the choice is checked against the
    database afterwards, so a wrong prediction fails there, not here)."""
    rooms: dict[str, list[str]] = {p: [] for p in PERSISTERS}
    for _ in range(40):
        if all(len(r) >= per_persister for r in rooms.values()):
            break
        room = await alice.create_room(preset="public_chat")
        rooms[config.stream_writers.event_persister_for_room(room)].append(room)
    assert all(len(r) >= per_persister for r in rooms.values()), rooms
    return rooms


def actual_persisters(cluster: Deployment, room_ids: list[str]) -> dict[str, set[str]]:
    """Where Synapse persisted each room's events (``events.instance_name``)."""
    assert cluster.database is not None
    rows = cluster.database.query(
        "SELECT room_id, instance_name FROM events WHERE room_id = ANY(%s)", (room_ids,)
    )
    out: dict[str, set[str]] = {r: set() for r in room_ids}
    for room_id, instance in rows:
        out[room_id].add(instance)
    return out


def main_events_positions(token: str, instance_ids: dict[int, str]) -> tuple[int, dict[str, int]]:
    """The main process's ``events`` positions, from a /sync ``next_batch``:
    the room part is ``s<min>`` or ``m<min>~<instance id>.<pos>~...`` (only
    writers ahead of the minimum are listed)."""
    room_key = token.split("_")[0]
    if room_key.startswith("s"):
        return int(room_key[1:]), {}
    assert room_key.startswith("m"), token
    minimum, *ahead = room_key[1:].split("~")
    positions = {}
    for entry in ahead:
        instance_id, pos = entry.split(".")
        positions[instance_ids[int(instance_id)]] = int(pos)
    return int(minimum), positions


async def assert_positions_agree_with_main(
    cluster: Deployment, obs: Observation, user: User
) -> None:
    """synrepl's per-writer ``events`` positions and their minimum are the
    main process's own (it reads the same POSITION/RDATA commands)."""
    assert cluster.database is not None and obs.client is not None
    seen: list[Any] = []

    async def agree() -> bool:
        sync = await user.call("GET", "/_matrix/client/v3/sync", params={"timeout": "0"})
        ids = dict(cluster.database.query("SELECT instance_id, instance_name FROM instance_map"))  # type: ignore[union-attr]
        minimum, ahead = main_events_positions(sync["next_batch"], ids)
        ours = obs.client.positions()["events"]  # type: ignore[union-attr]
        main_view = {p: ahead.get(p, minimum) for p in PERSISTERS}
        seen[:] = [main_view, ours, minimum]
        return ours == main_view and obs.client.persisted_upto("events") == minimum  # type: ignore[union-attr]

    deadline = time.monotonic() + 15
    while not await agree():
        assert time.monotonic() < deadline, f"main {seen[0]} (min {seen[2]}) != synrepl {seen[1]}"
        await sleep(0.2)


def event_batches(rec: Recorder, room_id: str) -> list[tuple[str, EventRow, bool]]:
    return [
        (b.writer, r, b.fetched)
        for b in rec.batches
        if b.stream == "events"
        for r in b.rows
        if isinstance(r, EventRow) and r.room_id == room_id
    ]


async def assert_every_event_once(
    rec: Recorder, user: User, rooms: dict[str, list[str]], timeout: float = 30
) -> None:
    """Every event the client API lists for each room arrived exactly once,
    from the room's persister, and no other event of those rooms did."""
    for persister, room_ids in rooms.items():
        for room_id in room_ids:
            listed = [e["event_id"] for e in await user.messages(room_id)]
            await wait_until(
                lambda room_id=room_id, listed=listed: (
                    {r.event_id for _, r, _ in event_batches(rec, room_id)} >= set(listed)
                ),
                timeout=timeout,
                what=f"every event of {room_id}",
            )
            got = event_batches(rec, room_id)
            counts = Counter(r.event_id for _, r, _ in got)
            assert [e for e, n in counts.items() if n > 1] == [], "events delivered twice"
            assert set(counts) == set(listed)
            assert {w for w, _, _ in got} == {persister}


# ---------------------------------------------------------------- who writes what


@pytest_twisted.ensureDeferred
async def test_every_writer_answers_replicate(cluster: Deployment, obs: Observation) -> None:
    """After REPLICATE, each stream gets a POSITION from exactly the
    instances that write it (caches: every process), synrepl's config agrees
    on who that is, and synrepl holds a position for each of them."""

    def answered() -> dict[str, set[str]]:
        writers: dict[str, set[str]] = {}
        for stream, writer, _, _ in obs.tap.positions():
            writers.setdefault(stream, set()).add(writer)
        return writers

    # The tap reads in a thread of its own and may be behind the client,
    # which has already heard every writer: give it time, then compare.
    with contextlib.suppress(AssertionError):
        await wait_until(lambda: answered() == WRITERS, timeout=10, what="the tap's POSITIONs")
    assert answered() == WRITERS
    config = obs.config
    for stream, writers in WRITERS.items():
        if stream != "caches":
            assert set(config.stream_writers.writers_for_stream(stream)) == writers, stream
    positions = obs.client.positions()  # type: ignore[union-attr]
    assert {s: set(w) for s, w in positions.items()} == WRITERS
    assert release_facts().streams - set(WRITERS) == {"federation"}


def test_nobody_is_said_to_write_federation_when_nobody_does(cluster: Deployment) -> None:
    """Without federation senders no process publishes the federation stream,
    and synrepl's config says so (a difference this suite found and fixed)."""
    assert cluster_config(cluster).stream_writers.writers_for_stream("federation") == ()


# ---------------------------------------------------------------- scenario 6


@pytest_twisted.ensureDeferred
async def test_rooms_sharded_across_two_event_persisters(
    api: Api, obs: Observation, cluster: Deployment
) -> None:
    """Rows of each room come from the persister that owns it; synrepl's
    choice of owner is where Synapse persisted every event of the room; and
    the per-writer positions and their minimum agree with the main process."""
    alice, bob = await new_user(api, "alice"), await new_user(api, "bob")
    rooms = await rooms_on_each_persister(alice, obs.config, per_persister=2)
    all_rooms = [r for rs in rooms.values() for r in rs]
    for room in all_rooms:
        await bob.join(room)
        for n in range(3):
            await alice.message(room, f"message {n}")
    await assert_every_event_once(obs.rec, alice, rooms)
    actual = actual_persisters(cluster, all_rooms)
    assert actual == {room: {p} for p, rs in rooms.items() for room in rs}
    await assert_positions_agree_with_main(cluster, obs, alice)
    await obs.assert_matches_wire()


@pytest_twisted.ensureDeferred
async def test_event_persister_killed_and_restarted(
    api: Api, obs: Observation, cluster: Deployment
) -> None:
    """persister1 is killed (SIGKILL) and started again while rooms on both
    persisters keep receiving messages, one of them sent to persister1's room
    while it is down (the main process retries until it is back).  synrepl
    gets every event once, from the right writer, reports no gap, and its
    positions agree with the main process's afterwards."""
    alice = await new_user(api, "alice")
    rooms = await rooms_on_each_persister(alice, obs.config, per_persister=1)
    down_room, up_room = rooms["persister1"][0], rooms["persister2"][0]
    for n in range(3):
        await alice.message(down_room, f"before {n}")
        await alice.message(up_room, f"before {n}")
    persister = cluster.processes["persister1"]
    subscribed = subscribers(cluster.redis_port, cluster.server_name)

    persister.kill()
    try:
        during = [await alice.message(up_room, f"while persister1 is down {n}") for n in range(3)]
        pending = defer.ensureDeferred(alice.message(down_room, "sent while persister1 is down"))
        await sleep(0.5)  # let the main process meet the refused connection first
        started = time.monotonic()
        await threads.deferToThread(persister.start)
        restart_seconds = time.monotonic() - started
    finally:
        if not persister.running():  # leave the cluster whole for the tests after this one
            await threads.deferToThread(persister.start)
    # Back on Redis too, so that the tests after this one hear from it.
    await threads.deferToThread(
        wait_for_subscribers, cluster.redis_port, cluster.server_name, subscribed
    )
    waited_for = await pending
    after = []
    for n in range(3):
        after.append(await alice.message(down_room, f"after {n}"))
        after.append(await alice.message(up_room, f"after {n}"))

    await assert_every_event_once(obs.rec, alice, rooms)
    delivered = {r.event_id for _, r, _ in event_batches(obs.rec, up_room)}
    delivered |= {r.event_id for _, r, _ in event_batches(obs.rec, down_room)}
    assert {*during, waited_for, *after} <= delivered
    assert actual_persisters(cluster, [down_room, up_room]) == {
        down_room: {"persister1"},
        up_room: {"persister2"},
    }
    assert obs.rec.gaps == []
    obs.rec.assert_in_order_once()
    await assert_positions_agree_with_main(cluster, obs, alice)
    await obs.assert_matches_wire()
    print(f"persister1 restarted in {restart_seconds:.2f} s")


# ---------------------------------------------------------------- scenario 7


def cluster_redis_running(server: RedisServer) -> bool:
    probe = server.client(register=False)
    try:
        return bool(probe.ping())
    except Exception:  # noqa: BLE001 - any failure means "not running"
        return False
    finally:
        probe.close()


async def wait_until_persisted(cluster: Deployment, body: str, timeout: float = 20) -> None:
    assert cluster.database is not None
    deadline = time.monotonic() + timeout
    query = "SELECT event_id FROM event_json WHERE json LIKE %s"
    while not await threads.deferToThread(cluster.database.query, query, (f"%{body}%",)):
        assert time.monotonic() < deadline, f"no event with {body!r} was persisted"
        await sleep(0.1)


@pytest_twisted.ensureDeferred
async def test_redis_restarted_while_messages_are_sent(
    api: Api, cluster: Deployment, cluster_redis: RedisServer, adapter: str
) -> None:
    """Redis is killed and started again under the running cluster while a
    sender keeps posting messages to rooms on both persisters; one message is
    sent and persisted while Redis is down, so its RDATA is never published.
    Afterwards synrepl has every event the client API lists, exactly once,
    the one sent during the outage fetched over HTTP."""
    config = cluster_config(cluster)
    rec = Recorder()
    client = await start_client(
        config, {"events": set(PERSISTERS)}, rec, streams={"events"}, adapter=adapter
    )
    try:
        alice = await new_user(api, "alice")
        rooms = await rooms_on_each_persister(alice, config, per_persister=1)
        targets = [r for rs in rooms.values() for r in rs]
        sent: list[str] = []
        stop = False

        async def sender() -> None:
            for n in itertools.count():
                if stop:
                    return
                sent.append(await alice.message(targets[n % len(targets)], f"steady {n}"))

        sending = defer.ensureDeferred(sender())
        await wait_until(lambda: len(sent) >= 10, what="the sender to get going")
        subscribed = subscribers(cluster.redis_port, cluster.server_name)
        await threads.deferToThread(cluster_redis.kill)
        outage_room = rooms["persister1"][0]
        # The client API does not answer while Redis is down (the main
        # process waits to see the event on replication), so wait for the
        # event in the database instead: then it was certainly persisted, and
        # its RDATA lost, during the outage.
        marker = f"sent while Redis is down {time.time_ns()}"
        sending_during = defer.ensureDeferred(alice.message(outage_room, marker))
        await wait_until_persisted(cluster, marker)
        await threads.deferToThread(cluster_redis.start)
        during = await sending_during
        # Every Synapse process and synrepl are back on Redis (the tests after
        # this one expect every writer to answer their REPLICATE).
        await threads.deferToThread(
            wait_for_subscribers, cluster.redis_port, cluster.server_name, subscribed
        )
        await wait_until(lambda: len(sent) >= 30, timeout=60, what="the sender to go on")
        stop = True
        await sending

        await assert_every_event_once(rec, alice, rooms, timeout=60)
        (fetched,) = [f for _, r, f in event_batches(rec, outage_room) if r.event_id == during]
        assert fetched, "the event persisted while Redis was down can only come over HTTP"
        assert rec.gaps == [] and rec.untyped() == []
        rec.assert_in_order_once()
        assert client.counters.reconnects >= 1
    finally:
        stop = True
        if not cluster_redis_running(cluster_redis):
            await threads.deferToThread(cluster_redis.start)  # for the tests after this one
        await client.stop()
        await client.http.close()  # type: ignore[union-attr]


# ---------------------------------------------------------------- scenario 8


@pytest_twisted.ensureDeferred
async def test_read_only_observer_publishes_nothing(
    api: Api, cluster: Deployment, cluster_redis: RedisServer
) -> None:
    """A read-only observer joins the cluster: Redis MONITOR sees it
    subscribe and nothing else (no PUBLISH, no publishing connection), yet it
    receives the same events rows as a normal client once the writers'
    POSITIONs (answering someone else's REPLICATE) have connected it."""
    config = cluster_config(cluster)
    monitor = MonitorTap(cluster_redis.port).start()
    observer_rec, normal_rec = Recorder(), Recorder()
    observer = await start_client(
        config,
        {},
        observer_rec,
        read_only=True,
        transport_options=TransportOptions(client_name="interop-observer"),
    )
    normal = None
    try:
        redis = cluster_redis.client()
        names = {c["name"]: c["addr"] for c in redis.client_list()}
        assert "interop-observer-pub" not in names
        address = names["interop-observer-sub"]
        # Someone else's REPLICATE makes every writer announce its positions.
        normal = await start_client(config, {"events": set(PERSISTERS)}, normal_rec)
        await wait_until(
            lambda: set(observer.positions().get("events", {})) >= set(PERSISTERS),
            what="the observer to connect the events stream",
        )
        alice = await new_user(api, "alice")
        rooms = await rooms_on_each_persister(alice, config, per_persister=1)
        for room_ids in rooms.values():
            for n in range(3):
                await alice.message(room_ids[0], f"observed {n}")
        await assert_every_event_once(observer_rec, alice, rooms)
        await assert_every_event_once(normal_rec, alice, rooms)
        assert observer_rec.untyped() == [] and observer_rec.gaps == []
    finally:
        await observer.stop()
        if normal is not None:
            await normal.stop()
        await sleep(0.2)
        monitor.stop()
    sent = monitor.by_address(address)
    # Exactly: name the connection, subscribe (and keepalive PINGs, if the
    # test ever ran 30 s).
    assert [c for c in sent if not c.startswith('"PING"')] == [
        '"CLIENT" "SETNAME" "interop-observer-sub"',
        f'"SUBSCRIBE" "{config.server_name}"',
    ]
    assert [p for a, p in monitor.publishes() if a == address] == []
    assert not any(observer.instance_name in p for _, p in monitor.publishes())


# ---------------------------------------------------------------- delivery under load


class SlowFetcher:
    """The client's own HTTP replication client, answering ``delay`` seconds late:
    a writer busy enough that refill pages take their time."""

    def __init__(self, inner: Any, delay: float) -> None:
        self._inner = inner
        self._delay = delay
        self.pages = 0

    async def get_repl_stream_updates(
        self, instance: str, stream: str, from_token: int, upto_token: int
    ) -> Any:
        self.pages += 1
        page = await self._inner.get_repl_stream_updates(instance, stream, from_token, upto_token)
        await sleep(self._delay)
        return page


@pytest_twisted.ensureDeferred
async def test_slow_handler_and_slow_http_refill_lose_nothing(
    api: Api, cluster: Deployment, cluster_redis: RedisServer
) -> None:
    """The fault report of issue 9 against the real cluster: a handler at 5 ms
    a row that stalls 2 s every 40 batches, a queue bound of 20 rows, refill
    pages answered 1.5 s late, and a burst of messages on both persisters
    while live rows keep coming.  Every event arrives exactly once, in order
    per writer, with no gap; the queue overflowed and was refilled over HTTP."""
    from synrepl.twisted.http_client import ReplicationHttpClient

    config = cluster_config(cluster)
    http = ReplicationHttpClient(reactor, config, instance_name="interop-slow")
    fetcher = SlowFetcher(http, 1.5)
    observation = Observation(
        config,
        cluster_redis.port,
        instance_name="interop-slow",
        streams={"events"},
        fetcher=fetcher,
        max_pending_rows=20,
    )
    await observation.start({"events": set(PERSISTERS)})
    client = observation.client
    assert client is not None
    calls = 0

    async def slow(batch: Any) -> None:
        nonlocal calls
        calls += 1
        await sleep(0.005 * len(batch.rows) + (2.0 if calls % 40 == 0 else 0.0))

    client.on_rows("events", slow)
    try:
        alice = await new_user(api, "alice")
        rooms = await rooms_on_each_persister(alice, config, per_persister=1)
        sends = [
            alice.message(room, f"burst {n}")
            for n in range(60)
            for room in (rooms["persister1"][0], rooms["persister2"][0])
        ]
        for start in range(0, len(sends), 10):  # ten at a time, as a busy room would
            await defer.gatherResults([defer.ensureDeferred(s) for s in sends[start : start + 10]])
        await assert_every_event_once(observation.rec, alice, rooms, timeout=180)
        observation.rec.assert_in_order_once()
        assert observation.rec.gaps == []
        assert client.counters.overflows >= 1, client.counters
        assert fetcher.pages >= 1
        print(f"slow refill: {client.counters.overflows} overflows, {fetcher.pages} pages")
    finally:
        await observation.stop()
        await http.close()


# ---------------------------------------------------------------- the asyncio example


@pytest_twisted.ensureDeferred
async def test_asyncio_example_across_a_redis_restart(
    api: Api, cluster: Deployment, cluster_redis: RedisServer, tmp_path: Path
) -> None:
    """``examples/tail_events_asyncio.py`` (an ``asyncio.run()`` program with
    no Twisted import of its own), run against the real cluster while Redis
    is killed and started again: every event the client API lists for rooms
    on both persisters is printed exactly once, with the writer Synapse
    persisted it on; it exits cleanly on SIGTERM."""
    example = Path(__file__).resolve().parents[2] / "examples" / "tail_events_asyncio.py"
    out_file = tmp_path / "events.jsonl"
    with out_file.open("w") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
            [sys.executable, str(example), "-c", str(cluster.shared_config)],
            stdout=out,
            stderr=subprocess.PIPE,
        )
    try:
        alice = await new_user(api, "alice")
        rooms = await rooms_on_each_persister(alice, cluster_config(cluster), per_persister=1)
        targets = [r for rs in rooms.values() for r in rs]

        def printed() -> list[dict[str, Any]]:
            return [json.loads(line) for line in out_file.read_text().splitlines()]

        # It is connected once its first event is printed.
        first = await alice.message(targets[0], "hello asyncio")
        await wait_until(
            lambda: any(e["event_id"] == first for e in printed()), timeout=60, what="connected"
        )
        for n in range(6):
            await alice.message(targets[n % 2], f"before the restart {n}")
        subscribed = subscribers(cluster.redis_port, cluster.server_name)
        await threads.deferToThread(cluster_redis.kill)
        await sleep(0.5)
        await threads.deferToThread(cluster_redis.start)
        await threads.deferToThread(
            wait_for_subscribers, cluster.redis_port, cluster.server_name, subscribed
        )
        for n in range(6):
            await alice.message(targets[n % 2], f"after the restart {n}")
        for persister, room_ids in rooms.items():
            for room in room_ids:
                listed = [e["event_id"] for e in await alice.messages(room)]
                try:
                    await wait_until(
                        lambda listed=listed: {e["event_id"] for e in printed()} >= set(listed),
                        timeout=60,
                        what=f"every event of {room}",
                    )
                except AssertionError:
                    missing = set(listed) - {e["event_id"] for e in printed()}
                    proc.kill()
                    _, err = proc.communicate(timeout=10)
                    raise AssertionError(
                        f"{len(missing)} of {len(listed)} events of {room} never printed; "
                        f"stderr:\n{err.decode(errors='replace')[-4000:]}"
                    ) from None
                mine = [e for e in printed() if e["room_id"] == room]
                assert sorted(e["event_id"] for e in mine) == sorted(set(listed))
                assert {e["writer"] for e in mine} == {persister}
        ids = [e["event_id"] for e in printed()]
        assert len(ids) == len(set(ids)), "an event printed twice"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if not cluster_redis_running(cluster_redis):
            await threads.deferToThread(cluster_redis.start)
