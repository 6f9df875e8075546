"""``synrepl export`` run as users run it (a subprocess) against the simulated
homeserver on real Redis: rows and full events into a Redis stream read
back with a consumer group, a SIGKILL and a restart (at-least-once, duplicates
with the same id), a Redis sink stopped and started again, partitions whose
union is the traffic, and a change of partition count by handover.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import redis as redis_py
from asyncio_helpers import run_in_new_loop
from client_helpers import sleep, unique_server_name, wait_until
from nats_server import NatsServer, nats_server_available
from redis_server import RedisServer, free_port
from test_cli_support import (
    SynapseDb,
    kill_leftover_clis,
    start_cli,
    write_config,
    write_event,
)
from twisted.internet import reactor, threads
from twisted.web import resource, server

from synrepl.checkpoints import FileCheckpointStore
from synrepl.deadletters import FileDeadLetterStore
from synrepl.export.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from synrepl.streams import EventRow, TypingRow
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


def ev(n: int, room: str) -> EventRow:
    return EventRow(f"$e{n}", room, "m.room.message", None, None, None, None, False, False)


ROOMS = [f"!room{n}:test" for n in range(12)]


def traffic(hs: FakeHomeserver, first: int, last: int) -> list[str]:
    """Events ``first..last`` (one token each) over the rooms; their ids."""
    ids = []
    for n in range(first, last + 1):
        hs.write("events", [ev(n, ROOMS[n % len(ROOMS)])])
        ids.append(f"$e{n}")
    return ids


def check_exactly(messages: list[dict[str, Any]], expected: list[str]) -> list[dict[str, Any]]:
    """De-duplicated by id: exactly ``expected`` (event ids), in order per room;
    a duplicate is the same message.  Returns the de-duplicated messages."""
    seen: dict[str, dict[str, Any]] = {}
    unique = []
    for m in messages:
        if m["id"] in seen:
            assert seen[m["id"]] == m
            continue
        seen[m["id"]] = m
        unique.append(m)
    got = [m["row"]["event_id"] for m in unique]
    assert sorted(got) == sorted(expected)
    for room in ROOMS:
        in_room = [m["row"]["event_id"] for m in unique if m["row"]["room_id"] == room]
        assert in_room == [e for e in expected if e in set(in_room)]
        tokens = [m["token"] for m in unique if m["row"]["room_id"] == room]
        assert tokens == sorted(tokens)
    return unique


async def scrape(port: int) -> dict[str, float]:
    """The export's /metrics: each sample's name (labels dropped) and value."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            return str(page.read().decode())

    samples = {}
    for line in (await threads.deferToThread(get)).splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]
            samples[name] = float(value)
    return samples


def export_args(config: str, to: str, *more: str) -> tuple[str, ...]:
    return ("export", "-c", config, "--to", to, *more)


@pytest_twisted.ensureDeferred
async def test_export_rows_of_any_stream_with_stable_ids(tmp_path: Path) -> None:
    """--stream typing: one message per row, ``row`` beside
    ``id``, ``server``, ``stream``, ``writer``, ``token``; the id is the row's
    place in its token."""
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    key = f"export-{hs.server_name}"
    r = redis_py.Redis()
    cli = start_cli(*export_args(config, f"redis-stream://127.0.0.1:6379/{key}", "-s", "typing"))
    try:
        await cli.wait_for_stderr("synrepl export:")
        tokens = [
            hs.write("typing", [TypingRow(f"!r{n}:t", ("@a:t",)), TypingRow("!x:t", ())])
            for n in range(3)
        ]
        await wait_until(lambda: r.xlen(key) == 6, what=f"six entries {cli.stderr}")
    finally:
        cli.signal("INT")
        assert await cli.wait() == 0, cli.stderr
        await hs.stop()
    got = read_group(r, key)
    r.delete(key)
    assert got[0] == {
        "id": f"{hs.server_name}/typing/master/{tokens[0]}/0",
        "server": hs.server_name,
        "stream": "typing",
        "writer": "master",
        "token": tokens[0],
        "row": {"room_id": "!r0:t", "user_ids": ["@a:t"]},
    }
    assert [m["id"].rsplit("/", 2)[1:] for m in got] == [
        [str(t), str(n)] for t in tokens for n in (0, 1)
    ]
    assert "6 messages in 3 sends" in cli.stderr


@pytest_twisted.ensureDeferred
async def test_sigkill_mid_traffic_then_restart_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL while events flow, restart with the same checkpoint: every
    event reaches the stream, duplicates (at most the batch in flight) carry
    the same id, and de-duplicated it is exactly the traffic, in order per room."""
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    key = f"export-{hs.server_name}"
    r = redis_py.Redis()
    args = export_args(
        config, f"redis-stream://127.0.0.1:6379/{key}", "--checkpoint", str(tmp_path / "ckpt")
    )
    first = start_cli(*args)
    expected: list[str] = []
    try:
        await first.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 1, 10)
        await wait_until(lambda: r.xlen(key) >= 5, what="the first entries")
        first.signal("KILL")
        expected += traffic(hs, 11, 30)  # written while it is dead
        assert await first.wait() != 0
        assert r.xlen(key) < 30
        second = start_cli(*args)
        await second.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 31, 35)  # the writer's next RDATA fetches what was missed
        await wait_until(
            lambda: len({f[b"id"] for _, f in r.xrange(key)}) == 35,
            what=f"35 distinct ids {second.stderr}",
        )
    finally:
        first.signal("KILL")
        if "second" in locals():
            second.signal("INT")
            assert await second.wait() == 0, second.stderr
        await hs.stop()
    got = read_group(r, key)
    r.delete(key)
    check_exactly(got, expected)
    assert len(got) - 35 <= 1  # at most the batch handled but not yet checkpointed


@pytest_twisted.ensureDeferred
async def test_sink_down_stops_the_checkpoint_and_back_resumes(tmp_path: Path) -> None:
    """The sink's Redis stopped: the export logs it, its checkpoint stops
    advancing, /metrics says the sink is down and for how long, and at most
    --max-pending-rows rows wait in memory; Redis back: every event arrives,
    in order (the overflow fetched from the writer), nothing lost."""
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    sink = RedisServer(tmp_path)
    sink.start()
    key = "events-out"
    checkpoint = tmp_path / "ckpt"
    metrics_port = free_port()
    cli = start_cli(
        *export_args(
            config,
            f"redis-stream://127.0.0.1:{sink.port}/{key}",
            "--checkpoint",
            str(checkpoint),
            "--max-pending-rows",
            "3",
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
        )
    )
    expected: list[str] = []
    store = FileCheckpointStore(checkpoint, server_name=hs.server_name, name="export")

    def saved() -> int:
        return (store.load() or {}).get("events", {}).get("master", 0)

    try:
        await cli.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 1, 5)
        await wait_until(lambda: saved() == 5, what="the checkpoint at 5")
        sink.kill()
        expected += traffic(hs, 6, 15)
        await cli.wait_for_stderr("unavailable")
        await sleep(1.0)
        assert saved() == 5  # nothing acknowledged, nothing saved
        down = await scrape(metrics_port)
        assert down["synrepl_export_sink_up"] == 0.0
        assert down["synrepl_export_waiting_seconds"] > 0.5
        assert down["synrepl_export_sink_failures_total"] >= 1
        assert down["synrepl_queued_rows"] <= 3  # the memory bound; the rest is refetched
        sink.start()
        await wait_until(lambda: saved() == 15, timeout=30, what=f"caught up {cli.stderr}")
        got = read_group(sink.client(), key)
        up = await scrape(metrics_port)
        assert up["synrepl_export_sink_up"] == 1.0
        assert up["synrepl_export_waiting_seconds"] == 0.0
        assert up["synrepl_export_acknowledged_token"] == 15
    finally:
        cli.signal("INT")
        assert await cli.wait() == 0, cli.stderr
        await hs.stop()
        sink.close()
    # Redis lost its data when killed (no persistence): what came before went with it.
    check_exactly(got, [e for e in expected if int(e[2:]) > 5])
    assert "is back after" in cli.stderr
    assert "sink redis-stream://127.0.0.1" in cli.stderr


@pytest_twisted.ensureDeferred
async def test_three_partitions_then_a_handover_to_two(tmp_path: Path) -> None:
    """Three --partition i/3 exporters sharing one checkpoint file: their
    union is exactly the traffic, each room on one partition, in order.
    Then all stop and two start with --previous-partitions 3: together with
    what the three exported, exactly the traffic again, no duplicate."""
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    r = redis_py.Redis()
    keys = [f"export-{hs.server_name}-{n}" for n in range(5)]
    checkpoint = str(tmp_path / "shared.ckpt")

    def start(index: int, count: int, key: str, *more: str) -> Any:
        return start_cli(
            *export_args(
                config,
                f"redis-stream://127.0.0.1:6379/{key}",
                "--checkpoint",
                checkpoint,
                "--partition",
                f"{index}/{count}",
                *more,
            )
        )

    three = [start(i, 3, keys[i]) for i in range(3)]
    expected: list[str] = []
    two: list[Any] = []
    try:
        for cli in three:
            await cli.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 1, 30)
        await wait_until(lambda: sum(r.xlen(k) for k in keys[:3]) == 30, what="30 entries")
        for cli in three:
            cli.signal("INT")
        for cli in three:
            assert await cli.wait() == 0, cli.stderr
        expected += traffic(hs, 31, 40)  # while no partition runs
        two = [start(j, 2, keys[3 + j], "--previous-partitions", "3") for j in range(2)]
        for cli in two:
            await cli.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 41, 50)
        await wait_until(
            lambda: sum(r.xlen(k) for k in keys[3:]) == 20,
            what=f"20 more entries {[c.stderr for c in two]}",
        )
        await sleep(0.5)
    finally:
        for cli in two:
            cli.signal("INT")
        for cli in two:
            assert await cli.wait() == 0, cli.stderr
        await hs.stop()
    parts = [read_group(r, k) for k in keys]
    r.delete(*keys)
    before = [m for part in parts[:3] for m in part]
    assert len(before) == 30
    check_exactly(before, expected[:30])
    for group in (parts[:3], parts[3:]):  # each room on one partition of a count
        rooms = [{m["row"]["room_id"] for m in part} for part in group]
        assert sum(len(r) for r in rooms) == len(set().union(*rooms))
    everything = [m for part in parts for m in part]
    assert len(everything) == 50  # no duplicate at all
    check_exactly(everything, expected)


class Receiver(resource.Resource):
    """A webhook receiver: refuses (400) a batch holding a room it is told to,
    takes (200) the rest; keeps what it took and checks every signature."""

    isLeaf = True

    def __init__(self, secret: bytes, refuse_room: str) -> None:
        super().__init__()
        self.secret = secret
        self.refuse_room = refuse_room
        self.taken: list[dict[str, Any]] = []
        self.refused = 0
        self.bad_signatures = 0

    def render_POST(self, request: server.Request) -> bytes:
        body = request.content.read()
        timestamp = request.getHeader(TIMESTAMP_HEADER) or ""
        mac = hmac.new(self.secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if (
            request.getHeader(SIGNATURE_HEADER) != f"sha256={mac}"
            or signature(self.secret, timestamp, body) != f"sha256={mac}"
        ):
            self.bad_signatures += 1
            request.setResponseCode(401)
            return b"bad signature"
        messages = json.loads(body)["messages"]
        assert request.getHeader("Idempotency-Key") == messages[0]["id"]
        if any(m["row"]["room_id"] == self.refuse_room for m in messages):
            self.refused += 1
            request.setResponseCode(400)
            return b"no thanks"
        self.taken.extend(messages)
        return b"ok"


@pytest_twisted.ensureDeferred
async def test_webhook_signed_refused_batches_are_dead_lettered(tmp_path: Path) -> None:
    """A webhook with a signing secret: every request verifies; a batch the
    receiver refuses (400) is retried --retries times, then kept in
    --dead-letters while the rest goes on; without --dead-letters the export
    stops, exit status 1, naming the refused batch."""
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text("s3cret-hook-key\n")
    receiver = Receiver(b"s3cret-hook-key", ROOMS[3])
    port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/hook"
    dead = tmp_path / "dead.jsonl"
    common = ("--webhook-secret-file", str(secret_file), "--retries", "1")
    cli = start_cli(*export_args(config, url, *common, "--dead-letters", str(dead)))
    expected: list[str] = []
    try:
        await cli.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 1, 20)
        await wait_until(lambda: len(receiver.taken) == 18, what=f"18 taken {cli.stderr}")
        letters = FileDeadLetterStore(dead, server_name=hs.server_name, name="export").letters()
        assert [letter.rows[0][1][0] for letter in letters] == ["$e3", "$e15"]
        assert all(letter.attempts == 2 and "400" in letter.error for letter in letters)
        cli.signal("INT")
        assert await cli.wait() == 0, cli.stderr
        stopping = start_cli(*export_args(config, url, *common))
        await stopping.wait_for_stderr("synrepl export:")
        traffic(hs, 21, 30)  # $e27 is refused
        assert await stopping.wait() == 1
    finally:
        cli.signal("INT")
        stopping.signal("INT")
        await port.stopListening()
        await hs.stop()
    assert receiver.bad_signatures == 0
    assert receiver.refused == 2 * 2 + 2
    assert [m["row"]["event_id"] for m in receiver.taken[:18]] == [
        e for e in expected if e not in ("$e3", "$e15")
    ]
    assert "delivery stopped" in stopping.stderr and "400" in stopping.stderr


@pytest_twisted.ensureDeferred
async def test_stopped_while_the_sink_is_down_then_resumed(tmp_path: Path) -> None:
    """Ctrl-C while a batch waits for a sink that is down: a clean exit (0),
    the waiting batch not checkpointed; restarted with the sink back, it
    exports from there, nothing lost, nothing twice."""
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    sink = RedisServer(tmp_path)
    sink.start()
    args = export_args(
        config,
        f"redis-stream://127.0.0.1:{sink.port}/out",
        "--checkpoint",
        str(tmp_path / "ckpt"),
    )
    expected: list[str] = []
    try:
        first = start_cli(*args)
        await first.wait_for_stderr("synrepl export:")
        sink.kill()
        expected += traffic(hs, 1, 5)
        await first.wait_for_stderr("unavailable")
        first.signal("INT")
        assert await first.wait() == 0, first.stderr
        store = FileCheckpointStore(tmp_path / "ckpt", server_name=hs.server_name, name="export")
        assert (store.load() or {}).get("events", {}).get("master", 0) == 0
        sink.start()
        second = start_cli(*args)
        await second.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 6, 8)
        r = sink.client()
        await wait_until(lambda: r.xlen("out") == 8, what=f"eight entries {second.stderr}")
        second.signal("INT")
        assert await second.wait() == 0, second.stderr
        got = read_group(r, "out")
    finally:
        await hs.stop()
        sink.close()
    assert "Traceback" not in first.stderr + second.stderr
    check_exactly(got, expected)
    assert len(got) == 8


@pytest_twisted.ensureDeferred
async def test_full_events_filtered_and_missing_ones_named(tmp_path: Path) -> None:
    """--full --type m.room.*: whole events of the matching types only; an
    event the database never has is still a message, ``missing`` saying why
    (no sender, no content), so nothing vanishes without a word."""
    hs = await homeserver()
    db = SynapseDb(tmp_path / "homeserver.db")
    write_event(hs, db, "$before", "!a:test", "@alice:test", {"body": "before"})
    config = database_config(tmp_path, hs, db)
    key = f"export-{hs.server_name}"
    r = redis_py.Redis()
    cli = start_cli(
        *export_args(config, f"redis-stream://127.0.0.1:6379/{key}", "--full", "--type", "m.room.*")
    )
    try:
        await cli.wait_for_stderr("synrepl export:")
        write_event(hs, db, "$m1", "!a:test", "@alice:test", {"body": "one"})
        write_event(hs, db, "$x", "!a:test", "@bob:test", {"x": 1}, type="org.example.custom")
        hs.write("events", [ev(99, "!a:test")])  # announced, never in the database
        write_event(hs, db, "$m2", "!a:test", "@bob:test", {"body": "two"})
        await wait_until(lambda: r.xlen(key) == 3, timeout=30, what=f"three entries {cli.stderr}")
    finally:
        cli.signal("INT")
        assert await cli.wait() == 0, cli.stderr
        await hs.stop()
        db.close()
    got = read_group(r, key)
    r.delete(key)
    assert [(m["event_id"], m.get("sender"), m.get("missing") is not None) for m in got] == [
        ("$m1", "@alice:test", False),
        ("$e99", None, True),
        ("$m2", "@bob:test", False),
    ]
    assert got[0]["content"] == {"body": "one"} and got[0]["type"] == "m.room.message"
    assert got[0]["id"] == f"{hs.server_name}/events/master/{got[0]['token']}/$m1"
    assert "content" not in got[1] and "not found" in got[1]["missing"]


def jetstream_messages(url: str, stream: str) -> list[dict[str, Any]]:
    """Every message of a JetStream stream, in stream order (nats-py, on a loop of its own)."""
    import nats

    async def read() -> list[dict[str, Any]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            count = (await js.stream_info(stream)).state.messages
            return [json.loads((await js.get_msg(stream, seq)).data) for seq in range(1, count + 1)]
        finally:
            await nc.close()

    return run_in_new_loop(read())


@pytest_twisted.ensureDeferred
async def test_jetstream_sigkill_mid_traffic_is_exactly_once(tmp_path: Path) -> None:
    """Into NATS JetStream (Debian's nats-server -js): SIGKILL while events
    flow and a restart from the checkpoint resend what was not checkpointed,
    with the same Nats-Msg-Id, and JetStream drops it: the stream holds the
    traffic exactly once, in order per room."""
    if not nats_server_available():
        pytest.skip("nats-server is not installed")
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    server = NatsServer(tmp_path / "nats")
    server.start()
    args = export_args(
        config, f"{server.url}/synapse.events", "--checkpoint", str(tmp_path / "ckpt")
    )
    expected: list[str] = []
    second = None
    try:
        first = start_cli(*args)
        await first.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 1, 30)
        await sleep(0.2)  # some exported, some not
        first.signal("KILL")
        assert await first.wait() != 0
        assert 0 < len(jetstream_messages(server.url, "synapse_events")) <= 30
        expected += traffic(hs, 31, 40)
        second = start_cli(*args)
        await second.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 41, 45)
        await wait_until(
            lambda: len(jetstream_messages(server.url, "synapse_events")) == 45,
            timeout=30,
            what=f"45 messages {second.stderr}",
        )
        await sleep(0.5)  # anything more would be a duplicate
        got = jetstream_messages(server.url, "synapse_events")
    finally:
        if second is not None:
            second.signal("INT")
            assert await second.wait() == 0, second.stderr
        await hs.stop()
        server.close()
    assert len(got) == 45
    check_exactly(got, expected)


@pytest_twisted.ensureDeferred
async def test_an_unpartitioned_export_hands_over_to_partitions(tmp_path: Path) -> None:
    """An export that ran without --partition is split by --partition j/2
    --previous-partitions 1: together exactly the traffic, nothing twice."""
    hs = await homeserver()
    config = str(write_config(tmp_path / "homeserver.yaml", hs))
    r = redis_py.Redis()
    keys = [f"export-{hs.server_name}-{n}" for n in range(3)]
    checkpoint = ("--checkpoint", str(tmp_path / "shared.ckpt"))
    expected: list[str] = []
    split: list[Any] = []
    try:
        alone = start_cli(
            *export_args(config, f"redis-stream://127.0.0.1:6379/{keys[0]}", *checkpoint)
        )
        await alone.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 1, 10)
        await wait_until(lambda: r.xlen(keys[0]) == 10, what="ten entries")
        alone.signal("INT")
        assert await alone.wait() == 0, alone.stderr
        expected += traffic(hs, 11, 15)
        split = [
            start_cli(
                *export_args(
                    config,
                    f"redis-stream://127.0.0.1:6379/{keys[1 + j]}",
                    *checkpoint,
                    "--partition",
                    f"{j}/2",
                    "--previous-partitions",
                    "1",
                )
            )
            for j in range(2)
        ]
        for cli in split:
            await cli.wait_for_stderr("synrepl export:")
        expected += traffic(hs, 16, 20)
        await wait_until(lambda: r.xlen(keys[1]) + r.xlen(keys[2]) == 10, what="ten more")
        await sleep(0.5)
    finally:
        for cli in split:
            cli.signal("INT")
        for cli in split:
            assert await cli.wait() == 0, cli.stderr
        await hs.stop()
    everything = [m for key in keys for m in read_group(r, key)]
    r.delete(*keys)
    assert len(everything) == 20
    check_exactly(everything, expected)
