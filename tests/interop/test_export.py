"""`synrepl export` against real Synapse, each sink read back by its own consumer.

The cluster (main process, two event persisters, PostgreSQL) is fed through
the client API: messages in rooms on both persisters, each room's messages
sent one after the other (so the room's stream order is the order sent),
the rooms at the same time.  `python -m synrepl export --full` runs as a
subprocess with a file checkpoint, into

- a Redis stream on a redis-server of its own (not the cluster's; with an
  append-only file, so the stream outlives a restart), read back with a
  consumer group (XREADGROUP, XACK);
- a NATS JetStream subject on a nats-server of its own, read back with a
  nats-py pull consumer (each message acked);
- a webhook: an aiohttp server in the test process that checks the HMAC
  signature (``X-Synrepl-Signature``) of every request.

What each test shows:

1-3. ``test_every_message_once_in_order_per_room``: every message of the
     traffic exactly once, in order per room, with its sender and body and
     the writer and stream token Synapse's database gives it (per sink).
4.   ``test_sigkill_mid_traffic_then_restart``: the exporter SIGKILLed twice
     while messages flow, restarted with the same --checkpoint: the
     checkpoint on disk at each kill never names a message the sink lacks;
     Redis Streams and webhook are at-least-once (a duplicate is the same
     message with the same ``id``; after de-duplicating by id, exactly the
     traffic in order per room); JetStream holds each message exactly once.
5.   ``test_sink_down_and_back``: the sink's server stopped while messages
     are sent, started again: nothing lost (after de-duplicating; nothing
     duplicated in JetStream), the exporter said the sink was unavailable,
     then that it is back, and exits 0.
6.   ``test_three_partitions_then_handover_to_two``: three
     ``--partition i/3`` exporters sharing one checkpoint file, each into a
     stream of its own: the union is exactly the traffic, each room on one
     partition only, in order.  Then all stopped, messages sent meanwhile,
     two ``--partition i/2 --previous-partitions 3`` exporters take over:
     over before and after, exactly the traffic, nothing twice, each room's
     later messages on the partition of the persister Synapse put it on.

The exporter's own messages are filtered to the test's rooms and to
``m.room.message`` when compared: the cluster is shared, and a "from now"
start may include a few set-up events of the rooms (the database positions
it seeds from can only be lower than the truth).  Run with ``-s`` to see
the measurements (duplicates, failed attempts).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from client_helpers import sleep, wait_until
from export_servers import (
    DurableRedisServer,
    NatsServer,
    WebhookReceiver,
    aio,
    nats_server_available,
)
from harness import Deployment
from matrix_api import Api, User, cluster_route
from prometheus_client.parser import text_string_to_metric_families
from redis_server import free_port
from twisted.internet import defer, reactor

from synrepl.checkpoints import FileCheckpointStore
from synrepl.config import load_config
from synrepl.sharding import shard_index

pytestmark = pytest.mark.cluster

PERSISTERS = ("persister1", "persister2")

#: Generous bounds on conditions; each normally holds within a second or two.
START_TIMEOUT = 60.0
ARRIVAL_TIMEOUT = 90.0

SINKS = ("redis-stream", "jetstream", "webhook")

_n = itertools.count()


def report(text: str) -> None:
    """A measurement, shown with ``pytest -s``."""
    print(f"[export] {text}", flush=True)


# ---------------------------------------------------------------- sink servers


@pytest.fixture(scope="module")
def sink_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DurableRedisServer]:
    """The Redis the exporter writes to: not the cluster's, and durable."""
    server = DurableRedisServer(tmp_path_factory.mktemp("export-sink-redis"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    if not nats_server_available():
        pytest.skip("no nats-server on PATH")
    server = NatsServer(tmp_path_factory.mktemp("export-nats"))
    server.start()
    try:
        yield server
    finally:
        server.close()


# ---------------------------------------------------------------- sinks and their consumers


class RedisStreamReader:
    """A consumer group on one stream key: XREADGROUP ``>``, XACK each entry."""

    def __init__(self, server: DurableRedisServer, key: str) -> None:
        self.key = key
        self.group = "interop-readers"
        self.client = server.client()
        self.client.xgroup_create(key, self.group, id="0", mkstream=True)
        self.got: list[dict[str, Any]] = []

    async def poll(self) -> None:
        while True:
            answer = self.client.xreadgroup(self.group, "reader", {self.key: ">"}, count=500)
            if not answer:
                return
            for entry_id, fields in answer[0][1]:
                message = json.loads(fields[b"data"])
                assert fields[b"id"].decode() == message["id"], fields
                self.got.append(message)
                self.client.xack(self.key, self.group, entry_id)

    def pending(self) -> int:
        """Entries delivered to the group and not acknowledged (none, if all went well)."""
        return int(self.client.xpending(self.key, self.group)["pending"])

    async def close(self) -> None:
        self.client.close()


class JetStreamReader:
    """A durable nats-py pull consumer on the stream that covers the subject."""

    def __init__(self, url: str, subject: str) -> None:
        self.url = url
        self.subject = subject
        self.got: list[dict[str, Any]] = []
        self.stream = ""
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None

    async def open(self) -> None:
        """After the exporter started: its sink makes the stream."""
        import nats
        import nats.js.errors

        self._nc = await nats.connect(self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        self._js = self._nc.jetstream(timeout=10)
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # a sink that could not open at start makes it at its first send
            try:
                self.stream = await self._js.find_stream_name_by_subject(self.subject)
                break
            except nats.js.errors.NotFoundError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no stream covers {self.subject}") from None
                await asyncio.sleep(0.1)
        self._sub = await self._js.pull_subscribe(
            self.subject, durable="reader", stream=self.stream
        )

    async def poll(self) -> None:
        while True:
            try:
                batch = await self._sub.fetch(batch=500, timeout=0.5)
            except TimeoutError:  # nats.errors.TimeoutError, or asyncio's (the same in 3.11)
                return
            for msg in batch:
                message = json.loads(msg.data)
                assert msg.headers["Nats-Msg-Id"] == message["id"], msg.headers
                self.got.append(message)
                await msg.ack()
            if len(batch) < 500:
                return

    async def stored(self) -> int:
        """How many messages the stream holds."""
        info = await self._js.stream_info(self.stream)
        return int(info.state.messages)

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


class WebhookReader:
    """What the receiver accepted, in the order received."""

    def __init__(self, receiver: WebhookReceiver) -> None:
        self.receiver = receiver

    @property
    def got(self) -> list[dict[str, Any]]:
        return self.receiver.messages()

    async def poll(self) -> None:
        return None

    async def close(self) -> None:
        await self.receiver.stop()


@attrs.define
class Sink:
    """One sink under test: its ``--to``, the extra options, its consumer,
    and how to stop and start its server."""

    kind: str
    url: str
    args: list[str]
    reader: Any
    nats: NatsServer | None = None
    redis: DurableRedisServer | None = None
    receiver: WebhookReceiver | None = None

    @property
    def exactly_once(self) -> bool:
        return self.kind == "jetstream"

    async def open(self) -> None:
        """Once an exporter is running (JetStream: it made the stream)."""
        if isinstance(self.reader, JetStreamReader) and self.reader._nc is None:
            await aio(self.reader.open())

    async def poll(self) -> list[dict[str, Any]]:
        """Everything the consumer has read so far, after reading what is new."""
        if self.kind == "jetstream":
            await aio(self.reader.poll())
        else:
            await self.reader.poll()
        return list(self.reader.got)

    async def stop_server(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        elif self.nats is not None:
            self.nats.stop()
        else:
            assert self.receiver is not None
            await aio(self.receiver.stop())

    async def start_server(self) -> None:
        if self.redis is not None:
            self.redis.start()
            # The consumer's connection broke with the server: a fresh one.
            assert isinstance(self.reader, RedisStreamReader)
            self.reader.client = self.redis.client()
        elif self.nats is not None:
            self.nats.start()
        else:
            assert self.receiver is not None
            await aio(self.receiver.start())


async def make_sink(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, name: str = "all"
) -> Sink:
    tag = f"{next(_n)}-{secrets.token_hex(3)}-{name}"
    if kind == "redis-stream":
        server: DurableRedisServer = request.getfixturevalue("sink_redis")
        key = f"synrepl-export-{tag}"
        return Sink(
            kind,
            f"redis-stream://127.0.0.1:{server.port}/{key}",
            [],
            RedisStreamReader(server, key),
            redis=server,
        )
    if kind == "jetstream":
        nats: NatsServer = request.getfixturevalue("nats_server")
        subject = f"synrepl.interop.{tag}"
        return Sink(
            kind, f"{nats.url}/{subject}", [], JetStreamReader(nats.url, subject), nats=nats
        )
    assert kind == "webhook"
    secret = secrets.token_hex(16)
    secret_file = tmp_path / f"webhook-{tag}.secret"
    secret_file.write_text(secret + "\n")
    receiver = WebhookReceiver(secret.encode(), path=f"/hook/{tag}")
    await aio(receiver.start())
    return Sink(
        kind,
        receiver.url,
        ["--webhook-secret-file", str(secret_file)],
        WebhookReader(receiver),
        receiver=receiver,
    )


@pytest_twisted.async_yield_fixture
async def sinks() -> AsyncIterator[list[Sink]]:
    made: list[Sink] = []
    yield made
    for sink in made:
        close = sink.reader.close()
        await (aio(close) if sink.kind != "redis-stream" else close)


# ---------------------------------------------------------------- the exporter as a process


class Export:
    """One ``python -m synrepl -v export --full`` run, stdout and stderr in files."""

    def __init__(self, argv: list[str], directory: Path, label: str) -> None:
        self.label = label
        self.out = directory / f"{label}.stdout"
        self.err = directory / f"{label}.stderr"
        self.argv = argv
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=directory,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
            )

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    async def wait_started(self, timeout: float = START_TIMEOUT) -> None:
        """Until it printed its start line (subscribed, the sink opened)."""

        def started() -> bool:
            return "synrepl export: full events" in self.stderr() or not self.running()

        await wait_until(started, timeout=timeout, what=f"{self.label} to start")
        assert self.running(), f"{self.label} exited {self.proc.returncode}:\n{self.stderr()}"

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGINT (Ctrl-C), then the exit status."""
        if self.running():
            self.proc.send_signal(signal.SIGINT)
        await wait_until(lambda: not self.running(), timeout=timeout, what=f"{self.label} exit")
        return int(self.proc.returncode)

    async def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def assert_clean(self) -> None:
        err = self.stderr()
        for bad in ("Traceback", "rows lost", "internal error", "(no content for"):
            assert bad not in err, f"{self.label}: {bad!r} in stderr:\n{err[-3000:]}"


class Exporters:
    """The command line for the cluster and its runs (all killed at teardown)."""

    def __init__(self, cluster: Deployment, directory: Path) -> None:
        self.cluster = cluster
        self.directory = directory
        self.runs: list[Export] = []

    def spawn(self, sink: Sink, checkpoint: Path, *extra: str) -> Export:
        configs = [a for path in self.cluster.config_files["master"] for a in ("-c", str(path))]
        argv = [sys.executable, "-m", "synrepl", "-v", "export", *configs, "--full"]
        argv += ["--to", sink.url, *sink.args, "--checkpoint", str(checkpoint), *extra]
        run = Export(argv, self.directory, f"export{len(self.runs) + 1}")
        self.runs.append(run)
        return run

    async def start(self, sink: Sink, checkpoint: Path, *extra: str) -> Export:
        run = self.spawn(sink, checkpoint, *extra)
        await run.wait_started()
        await sink.open()
        return run

    def kill_all(self) -> None:
        for run in self.runs:
            if run.running():
                run.proc.kill()
                run.proc.wait(timeout=10)


@pytest.fixture
def exporters(cluster: Deployment, tmp_path: Path) -> Iterator[Exporters]:
    made = Exporters(cluster, tmp_path)
    yield made
    made.kill_all()


# ---------------------------------------------------------------- traffic


@pytest_twisted.async_yield_fixture
async def capi(cluster: Deployment) -> AsyncIterator[Api]:
    """The cluster's client API, routed as Synapse's worker docs say."""
    api = Api(cluster_route(cluster.client_urls))
    yield api
    await api.close()


@attrs.define
class Traffic:
    """The test's rooms and what it sent into each, in order."""

    users: list[User]
    #: room -> the persister Synapse put it on
    rooms: dict[str, str]
    sent: dict[str, list[str]] = attrs.field(factory=dict)
    sender_of: dict[str, str] = attrs.field(factory=dict)
    body_of: dict[str, str] = attrs.field(factory=dict)
    tag: str = attrs.field(factory=lambda: secrets.token_hex(3))

    def __attrs_post_init__(self) -> None:
        for room in self.rooms:
            self.sent.setdefault(room, [])

    def count(self) -> int:
        return sum(len(ids) for ids in self.sent.values())

    def event_ids(self) -> set[str]:
        return {e for ids in self.sent.values() for e in ids}

    async def say(self, room: str, user: User) -> str:
        body = f"{self.tag} {len(self.sent[room])} in {room[:8]} from {user.user_id[1:8]}"
        event_id = await user.message(room, body)
        self.sent[room].append(event_id)
        self.sender_of[event_id] = user.user_id
        self.body_of[event_id] = body
        return event_id

    async def rounds(self, count: int) -> None:
        """``count`` messages into every room: a room's one after the
        other, the rooms (so both persisters) at the same time."""

        async def room_loop(room: str, first: int) -> None:
            for n in range(count):
                await self.say(room, self.users[(first + n) % len(self.users)])

        loops = [defer.ensureDeferred(room_loop(r, i)) for i, r in enumerate(self.rooms)]
        await with_timeout(defer.gatherResults(loops, consumeErrors=True), 120, "sending")


async def make_traffic(
    api: Api, cluster: Deployment, per_writer: int = 2, partitions: int | None = None
) -> Traffic:
    """Alice's public rooms, ``per_writer`` on each persister (and, with
    ``partitions``, at least one on each partition), Bob joined to each.
    Where each room lives is checked in Synapse's database."""
    stamp = time.time_ns() % 10**10
    alice = await api.register(f"exalice{next(_n)}x{stamp}")
    bob = await api.register(f"exbob{next(_n)}x{stamp}")
    config = load_config(*cluster.config_files["master"])
    rooms: dict[str, str] = {}

    def enough() -> bool:
        have = list(rooms.values())
        if any(have.count(w) < per_writer for w in PERSISTERS):
            return False
        return partitions is None or {shard_index(r, partitions) for r in rooms} == set(
            range(partitions)
        )

    for _ in range(60):
        if enough():
            break
        room = await alice.create_room(preset="public_chat")
        writer = config.stream_writers.event_persister_for_room(room)
        if list(rooms.values()).count(writer) >= per_writer and partitions is None:
            continue
        rooms[room] = writer
        await bob.join(room)
    assert enough(), rooms
    assert cluster.database is not None
    actual = dict(
        cluster.database.query(
            "SELECT DISTINCT room_id, instance_name FROM events WHERE room_id = ANY(%s)",
            (list(rooms),),
        )
    )
    assert actual == rooms, "a room is not on the persister synrepl expects"
    return Traffic([alice, bob], rooms)


class Sender:
    """Messages into every room until stopped: one loop per room (so each
    room's order is the order sent), the rooms at the same time."""

    def __init__(self, traffic: Traffic, pause: float = 0.2) -> None:
        self.traffic = traffic
        self.pause = pause
        self.stopped = False
        self.done: defer.Deferred[Any] | None = None

    def start(self) -> Sender:
        loops = [
            defer.ensureDeferred(self._loop(room, i)) for i, room in enumerate(self.traffic.rooms)
        ]
        self.done = defer.gatherResults(loops, consumeErrors=True)
        return self

    async def _loop(self, room: str, first: int) -> None:
        users = self.traffic.users
        for n in itertools.count(first):
            if self.stopped:
                return
            await self.traffic.say(room, users[n % len(users)])
            await sleep(self.pause)

    async def sent_more(self, count: int) -> None:
        goal = self.traffic.count() + count
        await wait_until(
            lambda: self.traffic.count() >= goal or (self.done is not None and self.done.called),
            timeout=60,
            what=f"{count} more messages sent",
        )
        assert self.done is not None and not self.done.called, "the sending loops ended"

    async def finish(self) -> None:
        self.stopped = True
        assert self.done is not None
        await with_timeout(self.done, 60, "the sending loops to end")


@pytest.fixture
def senders() -> Iterator[list[Sender]]:
    made: list[Sender] = []
    yield made
    for sender in made:
        sender.stopped = True


async def with_timeout(d: defer.Deferred[Any], seconds: float, what: str) -> Any:
    d.addTimeout(seconds, reactor)
    try:
        return await d
    except defer.TimeoutError:
        raise AssertionError(f"timed out after {seconds}s: {what}") from None


# ---------------------------------------------------------------- checks


def ours(messages: Sequence[dict[str, Any]], traffic: Traffic) -> list[dict[str, Any]]:
    """The messages of the test's rooms' m.room.message events."""
    return [
        m
        for m in messages
        if m.get("room_id") in traffic.rooms and m.get("type") == "m.room.message"
    ]


async def wait_arrived(sink: Sink, traffic: Traffic, runs: Sequence[Export]) -> None:
    """Until every message sent is in the sink (read by its consumer)."""
    wanted = traffic.event_ids()
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while True:
        got = {m["event_id"] for m in ours(await sink.poll(), traffic)}
        if wanted <= got:
            return
        if time.monotonic() > deadline:
            last = runs[-1] if runs else None
            raise AssertionError(
                f"{len(wanted - got)} of {len(wanted)} messages never reached {sink.kind}; "
                f"stderr of {last.label if last else '-'}:\n{last.stderr()[-3000:] if last else ''}"
            )
        await sleep(0.1)


def event_positions(cluster: Deployment, event_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
    """Where Synapse persisted each event: (writer, stream token), from its database."""
    assert cluster.database is not None
    rows = cluster.database.query(
        "SELECT event_id, instance_name, stream_ordering FROM events WHERE event_id = ANY(%s)",
        (list(event_ids),),
    )
    return {e: (w, int(t)) for e, w, t in rows}


def check_traffic(
    got: Sequence[dict[str, Any]], traffic: Traffic, cluster: Deployment, *, exactly_once: bool
) -> int:
    """The sink's messages of the test's rooms are the traffic: each message
    once (or, at-least-once, its copies identical with the same id), and
    after de-duplicating by id, each room's in the order sent; each with
    the event's sender, body, writer and token.  Returns the duplicates."""
    mine = ours(got, traffic)
    first: dict[str, dict[str, Any]] = {}
    ids_of_event: dict[str, set[str]] = defaultdict(set)
    for m in mine:
        copy = first.setdefault(m["id"], m)
        assert copy == m, f"two messages with id {m['id']} differ: {copy} != {m}"
        ids_of_event[m["event_id"]].add(m["id"])
    duplicates = len(mine) - len(first)
    if exactly_once:
        assert duplicates == 0, [i for i, n in _counts(m["id"] for m in mine).items() if n > 1]
    assert all(len(ids) == 1 for ids in ids_of_event.values()), {
        e: ids for e, ids in ids_of_event.items() if len(ids) > 1
    }
    unique = list(first.values())
    per_room = {
        room: [m["event_id"] for m in unique if m["room_id"] == room] for room in traffic.rooms
    }
    for room, sent in traffic.sent.items():
        assert per_room[room] == sent, (
            f"room {room} on {traffic.rooms[room]}: "
            f"missing {sorted(set(sent) - set(per_room[room]))}, "
            f"extra {sorted(set(per_room[room]) - set(sent))}, or out of order"
        )
    where = event_positions(cluster, list(traffic.event_ids()))
    server = cluster.server_name
    for m in unique:
        event_id = m["event_id"]
        writer, token = where[event_id]
        assert (m["writer"], m["token"]) == (writer, token), (m, where[event_id])
        assert m["id"] == f"{server}/events/{writer}/{token}/{event_id}", m
        assert (m["server"], m["stream"]) == (server, "events"), m
        assert m["sender"] == traffic.sender_of[event_id], m
        assert m["content"] == {"msgtype": "m.text", "body": traffic.body_of[event_id]}, m
        assert m["state_key"] is None and m["redacted"] is False and m["rejected"] is False, m
    assert {m["writer"] for m in unique} == set(PERSISTERS), "both persisters wrote"
    return duplicates


def _counts(values: Any) -> dict[Any, int]:
    counts: dict[Any, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    return counts


async def check_exactly_once_in_jetstream(sink: Sink, got: Sequence[dict[str, Any]]) -> None:
    """Every message the stream holds (the test's and any other room's) once."""
    assert isinstance(sink.reader, JetStreamReader)
    ids = [m["id"] for m in got]
    assert len(set(ids)) == len(ids), [i for i, n in _counts(ids).items() if n > 1]
    assert await aio(sink.reader.stored()) == len(ids)


# ---------------------------------------------------------------- 1-3: each sink


@pytest.mark.parametrize("kind", SINKS)
@pytest_twisted.ensureDeferred
async def test_every_message_once_in_order_per_room(
    kind: str,
    cluster: Deployment,
    capi: Api,
    tmp_path: Path,
    exporters: Exporters,
    sinks: list[Sink],
    request: pytest.FixtureRequest,
) -> None:
    """Messages in four rooms (two per persister, written at the same
    time) into the sink: its consumer reads each exactly once, each room's
    in the order sent, with sender, body, writer and token; the webhook's
    every request carried a valid signature."""
    traffic = await make_traffic(capi, cluster, per_writer=2)
    sink = await make_sink(kind, tmp_path, request)
    sinks.append(sink)
    run = await exporters.start(sink, tmp_path / "export.checkpoint")
    started = time.monotonic()
    await traffic.rounds(8)
    await wait_arrived(sink, traffic, exporters.runs)
    took = time.monotonic() - started
    assert await run.stop() == 0, run.stderr()
    got = await sink.poll()
    check_traffic(got, traffic, cluster, exactly_once=True)
    if kind == "redis-stream":
        assert sink.reader.pending() == 0
    if kind == "jetstream":
        await check_exactly_once_in_jetstream(sink, got)
    if kind == "webhook":
        assert sink.receiver is not None
        assert sink.receiver.requests and sink.receiver.bad_requests() == []
    run.assert_clean()
    assert "unavailable" not in run.stderr(), run.stderr()
    tail = run.stderr().strip().splitlines()[-1]
    assert tail.startswith("synrepl export: ") and tail.endswith(", 0 failed attempts)"), tail
    report(
        f"{kind}: {traffic.count()} messages in {len(traffic.rooms)} rooms in {took:.2f}s; {tail}"
    )


# ---------------------------------------------------------------- 4: SIGKILL


KILLS = 2


@pytest.mark.parametrize("kind", SINKS)
@pytest_twisted.ensureDeferred
async def test_sigkill_mid_traffic_then_restart(
    kind: str,
    cluster: Deployment,
    capi: Api,
    tmp_path: Path,
    exporters: Exporters,
    sinks: list[Sink],
    senders: list[Sender],
    request: pytest.FixtureRequest,
) -> None:
    """SIGKILL while messages flow, restart with the same --checkpoint
    (twice): the checkpoint on disk at each kill names nothing the sink does
    not have; at the end every message is there, each room's in order
    after de-duplicating by id (a duplicate is the same message, same id);
    JetStream (Nats-Msg-Id) stores each exactly once."""
    traffic = await make_traffic(capi, cluster, per_writer=2)
    sink = await make_sink(kind, tmp_path, request)
    sinks.append(sink)
    checkpoint = tmp_path / "export.checkpoint"
    run = await exporters.start(sink, checkpoint)
    sender = Sender(traffic).start()
    senders.append(sender)
    checked_at_kill = []
    for _ in range(KILLS):
        goal = len(ours(await sink.poll(), traffic)) + 6

        async def arrived(goal: int = goal) -> bool:
            return len(ours(await sink.poll(), traffic)) >= goal

        await poll_until(arrived, what="6 more messages in the sink")
        await run.kill()
        # The killed run sends nothing more: what the sink has now is all it got.
        have = {m["event_id"] for m in ours(await sink.poll(), traffic)}
        store = FileCheckpointStore(checkpoint, server_name=cluster.server_name, name="export")
        saved = store.load()
        store.close()
        assert saved is not None, "no checkpoint saved before the kill"
        where = event_positions(cluster, list(traffic.event_ids()))
        covered = [e for e, (w, t) in where.items() if t <= saved["events"].get(w, -1)]
        assert set(covered) <= have, f"checkpointed, not in the sink: {set(covered) - have}"
        checked_at_kill.append((len(have), len(covered)))
        await sender.sent_more(4)
        run = await exporters.start(sink, checkpoint)
        assert "synrepl: info: resuming from the checkpoint: " in run.stderr(), run.stderr()
    await sender.sent_more(8)
    await sender.finish()
    await wait_arrived(sink, traffic, exporters.runs)
    assert await run.stop() == 0, run.stderr()
    got = await sink.poll()
    duplicates = check_traffic(got, traffic, cluster, exactly_once=sink.exactly_once)
    if kind == "jetstream":
        await check_exactly_once_in_jetstream(sink, got)
    if kind == "webhook":
        assert sink.receiver is not None and sink.receiver.bad_requests() == []
    for each in exporters.runs:
        each.assert_clean()
    report(
        f"{kind}: {KILLS} SIGKILLs, (in the sink, checkpointed) at each: {checked_at_kill}; "
        f"{traffic.count()} messages, {duplicates} duplicates after the restarts"
    )


async def poll_until(condition: Any, what: str, timeout: float = ARRIVAL_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(0.05)


# ---------------------------------------------------------------- 5: the sink down


@pytest.mark.parametrize("kind", SINKS)
@pytest_twisted.ensureDeferred
async def test_sink_down_and_back(
    kind: str,
    cluster: Deployment,
    capi: Api,
    tmp_path: Path,
    exporters: Exporters,
    sinks: list[Sink],
    request: pytest.FixtureRequest,
) -> None:
    """The sink's server (the sink's redis-server, nats-server, the webhook
    receiver) stopped between messages, and messages sent while it is down;
    started again: every message arrives, each room's in order (after
    de-duplicating by id; JetStream: none twice), the exporter logged that
    the sink was unavailable and then back, and stops with exit 0.  Its
    /metrics meanwhile: the sink down, a batch waiting, the failed attempts
    counted (three, with backoff; one for JetStream, whose attempt waits
    out a 10 s publish timeout); then up, nothing waiting."""
    traffic = await make_traffic(capi, cluster, per_writer=1)
    sink = await make_sink(kind, tmp_path, request)
    sinks.append(sink)
    metrics = free_port()
    run = await exporters.start(
        sink, tmp_path / "export.checkpoint", "--metrics-listen", f"127.0.0.1:{metrics}"
    )
    await traffic.rounds(3)
    await wait_arrived(sink, traffic, exporters.runs)
    assert scrape(metrics)["synrepl_export_sink_up"] == 1.0
    await sink.stop_server()
    down_at = time.monotonic()
    await traffic.rounds(3)
    await wait_until(
        lambda: "unavailable" in run.stderr() or not run.running(),
        timeout=ARRIVAL_TIMEOUT,
        what="the exporter to notice the sink is down",
    )
    assert run.running(), run.stderr()
    noticed = time.monotonic() - down_at
    await traffic.rounds(2)
    failures = 1 if kind == "jetstream" else 3
    await wait_until(
        lambda: scrape(metrics)["synrepl_export_sink_failures_total"] >= failures,
        timeout=ARRIVAL_TIMEOUT,
        what=f"{failures} failed attempts",
    )
    down = scrape(metrics)
    assert down["synrepl_export_sink_up"] == 0.0 and down["synrepl_export_waiting_seconds"] > 0
    await sink.start_server()
    down_for = time.monotonic() - down_at
    await traffic.rounds(2)
    await wait_arrived(sink, traffic, exporters.runs)
    back = scrape(metrics)
    assert back["synrepl_export_sink_up"] == 1.0 and back["synrepl_export_waiting_seconds"] == 0
    assert await run.stop() == 0, run.stderr()
    got = await sink.poll()
    duplicates = check_traffic(got, traffic, cluster, exactly_once=sink.exactly_once)
    if kind == "jetstream":
        await check_exactly_once_in_jetstream(sink, got)
    err = run.stderr()
    assert f"synrepl: warning: sink {sink.url} unavailable" in err, err[-3000:]
    assert f": sink {sink.url} is back after" in err, err[-3000:]
    run.assert_clean()
    tail = err.strip().splitlines()[-1]
    report(
        f"{kind}: down {down_for:.1f}s (noticed after {noticed:.1f}s); {traffic.count()} "
        f"messages, {duplicates} duplicates; {tail}"
    )


def scrape(port: int) -> dict[str, float]:
    """The exporter's /metrics: each sample's value by name (one sink, so no labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "writer" not in sample.labels:
                values[sample.name] = sample.value
    return values


# ---------------------------------------------------------------- 6: partitions, handover


@pytest_twisted.ensureDeferred
async def test_three_partitions_then_handover_to_two(
    cluster: Deployment,
    capi: Api,
    tmp_path: Path,
    exporters: Exporters,
    sinks: list[Sink],
    request: pytest.FixtureRequest,
) -> None:
    """Three ``--partition i/3`` exporters sharing one checkpoint file, each
    into a Redis stream of its own: together exactly the traffic, each room
    on one partition only (the one its id hashes to), in order.  All
    stopped cleanly, messages sent meanwhile, then two ``--partition i/2
    --previous-partitions 3`` exporters on the same file: over all five
    streams, exactly the traffic, nothing twice, each room's messages in
    order, the later ones on the partition of the persister Synapse put the
    room on (partitions spread rooms as Synapse spreads them)."""
    traffic = await make_traffic(capi, cluster, per_writer=2, partitions=3)
    checkpoint = tmp_path / "partitions.checkpoint"
    old = [await make_sink("redis-stream", tmp_path, request, f"p{i}of3") for i in range(3)]
    sinks.extend(old)
    runs = [exporters.spawn(s, checkpoint, "--partition", f"{i}/3") for i, s in enumerate(old)]
    for run in runs:
        await run.wait_started()
    await traffic.rounds(5)
    before = {room: list(ids) for room, ids in traffic.sent.items()}
    await wait_arrived_part(old, traffic, before)
    for run in runs:
        assert await run.stop() == 0, run.stderr()
    got_old = [ours(await s.poll(), traffic) for s in old]
    owner = owners(got_old)
    assert owner == {room: shard_index(room, 3) for room in traffic.rooms}, owner
    assert sorted(m["id"] for ms in got_old for m in ms) == sorted(
        {m["id"] for ms in got_old for m in ms}
    ), "a message on two partitions, or twice on one"
    for room, ids in before.items():
        assert [m["event_id"] for m in got_old[owner[room]] if m["room_id"] == room] == ids
    for run in runs:
        assert "partition" in run.stderr() and " left to other partitions" in run.stderr()
        run.assert_clean()

    await traffic.rounds(2)  # while no exporter runs
    new = [await make_sink("redis-stream", tmp_path, request, f"p{i}of2") for i in range(2)]
    sinks.extend(new)
    handover = ["--previous-partitions", "3"]
    runs = [
        exporters.spawn(s, checkpoint, "--partition", f"{i}/2", *handover)
        for i, s in enumerate(new)
    ]
    for run in runs:
        await run.wait_started()
    await traffic.rounds(3)
    after = {room: ids[len(before[room]) :] for room, ids in traffic.sent.items()}
    await wait_arrived_part(new, traffic, after)
    for run in runs:
        assert await run.stop() == 0, run.stderr()
        run.assert_clean()
    got_new = [ours(await s.poll(), traffic) for s in new]
    new_owner = owners(got_new)
    persister_of = {room: PERSISTERS.index(w) for room, w in traffic.rooms.items()}
    assert new_owner == persister_of, (new_owner, persister_of)
    everything = [m for ms in got_old + got_new for m in ms]
    ids = [m["id"] for m in everything]
    assert len(ids) == len(set(ids)), "a message exported twice over the handover"
    for room, ids_after in after.items():
        assert [
            m["event_id"] for m in got_new[new_owner[room]] if m["room_id"] == room
        ] == ids_after
    # Over all five streams in order (old then new): exactly the traffic.
    check_traffic(everything, traffic, cluster, exactly_once=True)
    report(
        f"partitions: {traffic.count()} messages in {len(traffic.rooms)} rooms; 3 partitions "
        f"exported {[len(ms) for ms in got_old]}, after the handover 2 exported "
        f"{[len(ms) for ms in got_new]}, none twice"
    )


def owners(per_partition: Sequence[Sequence[dict[str, Any]]]) -> dict[str, int]:
    """room -> the one partition its messages came from."""
    seen: dict[str, set[int]] = defaultdict(set)
    for index, messages in enumerate(per_partition):
        for m in messages:
            seen[m["room_id"]].add(index)
    assert all(len(p) == 1 for p in seen.values()), {r: p for r, p in seen.items() if len(p) > 1}
    return {room: next(iter(p)) for room, p in seen.items()}


async def wait_arrived_part(
    parts: Sequence[Sink], traffic: Traffic, wanted: dict[str, list[str]]
) -> None:
    """Until every message of ``wanted`` is in one of the partitions' streams."""
    ids = {e for es in wanted.values() for e in es}

    async def arrived() -> bool:
        got = {m["event_id"] for s in parts for m in ours(await s.poll(), traffic)}
        return ids <= got

    await poll_until(arrived, what=f"{len(ids)} messages over the partitions")
