"""The export sinks, and the Exporter on them, against real servers.

- Redis Streams: private ``redis-server`` processes (:mod:`redis_server`);
- NATS JetStream: Debian's ``nats-server -js`` (:mod:`nats_server`), killed
  and restarted on the same store;
- webhooks: an ``aiohttp.web`` receiver in the test, on a loopback port.

Each test's coroutine runs on a loop of its own
(:func:`asyncio_helpers.run_in_new_loop`): the suite's main thread runs
Twisted's asyncio reactor, where ``asyncio.run`` refuses to nest.
``asyncio.wait_for(..., GUARD)`` around a call that must fail or return on
its own turns a hang into a failure; it is far above the sink's timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import pytest
import redis as redis_py
from asyncio_helpers import run_in_new_loop
from nats_server import NatsServer, nats_server_available
from redis_server import RedisServer, free_port, redis_server_available

from synrepl.connection import ReconnectBackoff
from synrepl.export import (
    Exporter,
    ExportMessage,
    ExportStopped,
    Partition,
    SinkRejected,
    SinkUnavailable,
    messages_of_rows,
)
from synrepl.export.jetstream import JetStreamSink
from synrepl.export.redis_stream import RedisStreamSink
from synrepl.export.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookSink,
    batch_body,
    signature,
)
from synrepl.positions import RowsReceived
from synrepl.sharding import shard_index
from synrepl.streams import TypingRow

SERVER = "hs.example"
#: Bounds a call that must return or fail on its own (sink timeouts are 0.5-2 s).
GUARD = 15.0

needs_redis = pytest.mark.skipif(not redis_server_available(), reason="needs redis-server")
needs_nats = pytest.mark.skipif(not nats_server_available(), reason="needs nats-server")


def batch(token: int, *rooms: str, writer: str = "master") -> RowsReceived:
    return RowsReceived(
        "typing", writer, token, tuple(TypingRow(r, ("@u:hs",)) for r in rooms), False
    )


def messages(token: int, count: int = 1, *, writer: str = "master") -> list[ExportMessage]:
    """``count`` messages of one token, rooms ``!t<token>-<n>:hs``."""
    rooms = [f"!t{token}-{n}:hs" for n in range(count)]
    return messages_of_rows(SERVER, batch(token, *rooms, writer=writer))


def quick_backoff() -> ReconnectBackoff:
    return ReconnectBackoff(min_delay=0.01, max_delay=0.05)


class Observed:
    """A real sink, with an event set on each failed attempt (open or send)
    and one on each acknowledged send, so a test waits on them."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.failures = 0
        self.failed = asyncio.Event()
        self.sent = asyncio.Event()

    @property
    def target(self) -> str:
        return str(self.sink.target)

    async def _watch(self, call: Any) -> None:
        try:
            await call
        except SinkUnavailable:
            self.failures += 1
            self.failed.set()
            raise

    async def open(self) -> None:
        await self._watch(self.sink.open())

    async def send(self, batch: Sequence[ExportMessage]) -> None:
        await self._watch(self.sink.send(batch))
        self.sent.set()

    async def close(self) -> None:
        await self.sink.close()

    async def next_failure(self) -> None:
        self.failed.clear()
        await self.failed.wait()


# ====================================================================== Redis Streams


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the tests that do not disturb it (a key each)."""
    if not redis_server_available():
        pytest.skip("needs redis-server")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test, which stops, pauses or reconfigures it."""
    if not redis_server_available():
        pytest.skip("needs redis-server")
    with RedisServer(tmp_path) as server:
        yield server


def redis_url(server: RedisServer) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


def entries(client: redis_py.Redis, key: str) -> list[tuple[str, dict[str, Any]]]:
    """``(id field, decoded data)`` of every entry, in stream order."""
    return [
        (fields[b"id"].decode(), json.loads(fields[b"data"])) for _, fields in client.xrange(key)
    ]


@needs_redis
def test_redis_entries_carry_data_and_id_and_read_back_with_a_consumer_group(
    shared_redis: RedisServer,
) -> None:
    key = "export-group"
    client = shared_redis.client()
    client.xgroup_create(key, "readers", id="0", mkstream=True)
    first, second = messages(1, 3), messages(2, 2)
    sink = RedisStreamSink(redis_url(shared_redis), key, timeout=5)

    async def main() -> None:
        await sink.open()
        await sink.send(first)
        await sink.send(second)
        await sink.close()

    run_in_new_loop(main())
    sent = first + second
    raw = client.xrange(key)
    assert [set(fields) for _, fields in raw] == [{b"data", b"id"}] * len(sent)
    assert [fields[b"data"] for _, fields in raw] == [m.data for m in sent]
    assert entries(client, key) == [(m.id, m.body) for m in sent]
    # A consumer group reads them in order, acknowledges, and has nothing pending.
    reply = client.xreadgroup("readers", "consumer-1", {key: ">"}, count=100)
    [(stream_key, read)] = reply
    assert stream_key == key.encode()
    assert [fields[b"id"].decode() for _, fields in read] == [m.id for m in sent]
    assert client.xack(key, "readers", *[entry_id for entry_id, _ in read]) == len(sent)
    assert client.xpending(key, "readers")["pending"] == 0
    assert client.xreadgroup("readers", "consumer-1", {key: ">"}, count=100) == []


@needs_redis
def test_a_redis_batch_is_one_multi_exec(shared_redis: RedisServer) -> None:
    key = "export-transaction"
    client = shared_redis.client()
    sink = RedisStreamSink(redis_url(shared_redis), key, timeout=5)

    async def main() -> None:
        await sink.open()
        client.config_resetstat()
        await sink.send(messages(1, 5))
        await sink.close()

    run_in_new_loop(main())
    stats = client.info("commandstats")
    calls = {
        name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("multi", "exec", "xadd")
    }
    assert calls == {"multi": 1, "exec": 1, "xadd": 5}
    assert client.xlen(key) == 5


@needs_redis
def test_maxlen_bounds_the_redis_stream_key(shared_redis: RedisServer) -> None:
    key = "export-maxlen"
    client = shared_redis.client()
    sent: list[ExportMessage] = []
    sink = RedisStreamSink(redis_url(shared_redis), key, maxlen=100, timeout=5)

    async def main() -> None:
        for token in range(1, 41):
            sent.extend(batch_messages := messages(token, 50))
            await sink.send(batch_messages)
        await sink.close()

    run_in_new_loop(main())
    assert len(sent) == 2000
    length = client.xlen(key)
    # MAXLEN ~ trims whole macro-nodes (100 entries by default): at least
    # maxlen entries, less than a node more.
    assert 100 <= length < 200, length
    assert [entry_id for entry_id, _ in entries(client, key)] == [m.id for m in sent[-length:]]


@needs_redis
def test_a_stopped_redis_is_unavailable_and_the_same_sink_sends_after_a_restart(
    own_redis: RedisServer,
) -> None:
    key = "export-restart"
    sink = RedisStreamSink(redis_url(own_redis), key, timeout=2)
    after = messages(3, 2)

    async def main() -> list[str]:
        await sink.send(messages(1))
        own_redis.kill()
        errors = []
        for call in (sink.send(messages(2)), sink.open()):
            with pytest.raises(SinkUnavailable) as e:
                await asyncio.wait_for(call, GUARD)
            errors.append(str(e.value))
        own_redis.start()
        await sink.send(after)
        await sink.close()
        return errors

    errors = run_in_new_loop(main())
    for error in errors:
        assert error.startswith(f"redis-stream://127.0.0.1:{own_redis.port}/{key}: "), error
    # (The restarted server keeps no data: the batch sent since is all there is.)
    assert entries(own_redis.client(), key) == [(m.id, m.body) for m in after]


@needs_redis
def test_a_redis_that_does_not_answer_is_unavailable_within_the_timeout(
    own_redis: RedisServer,
) -> None:
    """CLIENT PAUSE WRITE: the server takes the transaction and answers
    nothing.  One attempt, bounded by the timeout (no library retries that
    would multiply it); the same sink sends once the pause is lifted."""
    key = "export-paused"
    control = own_redis.client()
    sink = RedisStreamSink(redis_url(own_redis), key, timeout=0.5)
    later = messages(2)

    async def main() -> str:
        await sink.send(messages(1))
        control.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        try:
            with pytest.raises(SinkUnavailable) as e:
                await asyncio.wait_for(sink.send(messages(2)), 4.0)
        finally:
            control.execute_command("CLIENT", "UNPAUSE")
        await sink.send(later)
        await sink.close()
        return str(e.value)

    error = run_in_new_loop(main())
    assert error.startswith(f"redis-stream://127.0.0.1:{own_redis.port}/{key}: Timeout"), error
    # At least once: the timed-out batch may have been stored too when the
    # pause ended, and the resend after it, each entry with its id.
    assert entries(control, key)[-1] == (later[0].id, later[0].body)


def test_a_redis_address_that_never_answers_is_unavailable_within_the_timeout() -> None:
    """A listener that takes connections and never answers (a hung server):
    open (PING) and send each fail once, after the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        sink = RedisStreamSink(f"redis://127.0.0.1:{port}/0", "k", timeout=0.5)

        async def main() -> list[str]:
            errors = []
            for call in (sink.open(), sink.send(messages(1))):
                with pytest.raises(SinkUnavailable) as e:
                    await asyncio.wait_for(call, 4.0)
                errors.append(str(e.value))
            await sink.close()
            return errors

        errors = run_in_new_loop(main())
    for error in errors:
        assert error.startswith(f"redis-stream://127.0.0.1:{port}/k: Timeout"), error


@needs_redis
def test_a_key_of_the_wrong_type_is_refused_with_a_clear_message(
    shared_redis: RedisServer,
) -> None:
    key = "export-wrong-type"
    client = shared_redis.client()
    client.set(key, "not a stream")
    sink = RedisStreamSink(redis_url(shared_redis), key, timeout=5)

    async def main() -> None:
        try:
            await sink.send(messages(1, 3))
        finally:
            await sink.close()

    with pytest.raises(SinkRejected) as e:
        run_in_new_loop(main())
    assert str(e.value) == (
        f"redis-stream://127.0.0.1:{shared_redis.port}/{key} refused XADD: "
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    )
    assert client.get(key) == b"not a stream"


@needs_redis
@pytest.mark.parametrize("refusal", ["OOM", "READONLY"])
def test_a_redis_refusing_writes_for_now_is_unavailable_not_rejected(
    own_redis: RedisServer, refusal: str
) -> None:
    """OOM (maxmemory reached) and READONLY (a replica) pass: the same XADDs
    succeed once the server is back to normal, so the batch waits."""
    key = "export-refusal"
    control = own_redis.client()
    sink = RedisStreamSink(redis_url(own_redis), key, timeout=5)
    batch_messages = messages(1, 2)

    def refuse() -> None:
        if refusal == "OOM":
            control.config_set("maxmemory", "1")
        else:
            control.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))

    def recover() -> None:
        if refusal == "OOM":
            control.config_set("maxmemory", "0")
        else:
            control.execute_command("REPLICAOF", "NO", "ONE")

    async def main() -> str:
        await sink.open()
        refuse()
        try:
            with pytest.raises(SinkUnavailable) as e:
                await sink.send(batch_messages)
        finally:
            recover()
        await sink.send(batch_messages)
        await sink.close()
        return str(e.value)

    error = run_in_new_loop(main())
    assert error.startswith(f"redis-stream://127.0.0.1:{own_redis.port}/{key}: {refusal} "), error
    assert entries(control, key) == [(m.id, m.body) for m in batch_messages]


# ---------------------------------------------------------------------- the Exporter on Redis


@needs_redis
def test_the_exporter_waits_for_redis_to_come_back(own_redis: RedisServer) -> None:
    from prometheus_client import CollectorRegistry

    from synrepl.prometheus import ExporterCollector

    key = "export-exporter"
    sink = Observed(RedisStreamSink(redis_url(own_redis), key, timeout=2))
    now = [1000.0]
    exporter = Exporter(sink, server_name=SERVER, backoff=quick_backoff(), clock=lambda: now[0])
    registry = CollectorRegistry()
    registry.register(ExporterCollector(exporter))
    seen: dict[str, Any] = {}

    def metric(name: str) -> float | None:
        return registry.get_sample_value(name, {"sink": sink.target})

    async def main() -> None:
        await exporter.export_rows(batch(1, "!a:hs"))
        seen["up before"] = exporter.stats.sink_up
        own_redis.kill()
        task = asyncio.ensure_future(exporter.export_rows(batch(2, "!b:hs", "!c:hs")))
        await sink.next_failure()
        await sink.next_failure()  # retried: still waiting
        now[0] += 12.5
        seen["while down"] = (
            task.done(),
            exporter.stats.sink_up,
            exporter.behind(),
            exporter.stats.acknowledged["typing"]["master"],
            metric("synrepl_export_sink_up"),
            metric("synrepl_export_waiting_seconds"),
        )
        own_redis.start()
        await asyncio.wait_for(task, GUARD)
        await exporter.close()

    run_in_new_loop(main())
    assert seen["up before"] is True
    assert seen["while down"] == (False, False, 12.5, 1, 0.0, 12.5)
    stats = exporter.stats
    assert stats.sink_failures >= 2 and stats.sink_failures == sink.failures
    assert stats.sink_up and stats.waiting_since is None and exporter.behind() == 0.0
    assert (stats.messages, stats.batches) == (3, 2)
    assert stats.acknowledged == {"typing": {"master": 2}}
    assert metric("synrepl_export_sink_up") == 1.0
    assert metric("synrepl_export_sink_failures_total") == stats.sink_failures
    assert metric("synrepl_export_waiting_seconds") == 0.0
    assert [i for i, _ in entries(own_redis.client(), key)] == [
        "hs.example/typing/master/2/0",
        "hs.example/typing/master/2/1",
    ]


@needs_redis
def test_closing_the_exporter_while_redis_is_down_stops_the_batch(own_redis: RedisServer) -> None:
    sink = Observed(RedisStreamSink(redis_url(own_redis), "export-close", timeout=2))
    exporter = Exporter(sink, server_name=SERVER, backoff=quick_backoff())

    async def main() -> None:
        own_redis.kill()
        task = asyncio.ensure_future(exporter.export_rows(batch(7, "!a:hs")))
        await sink.next_failure()
        await exporter.close()
        with pytest.raises(ExportStopped, match="was down"):
            await asyncio.wait_for(task, GUARD)

    run_in_new_loop(main())
    assert exporter.stats.acknowledged == {}
    assert exporter.stats.messages == 0 and exporter.stats.sink_failures >= 1


@needs_redis
def test_a_partition_exports_only_its_rooms_to_redis(shared_redis: RedisServer) -> None:
    key = "export-partition"
    rooms = [f"!room{i}:hs" for i in range(30)]
    mine = [n for n, room in enumerate(rooms) if shard_index(room, 2) == 0]
    sink = RedisStreamSink(redis_url(shared_redis), key, timeout=5)
    exporter = Exporter(sink, server_name=SERVER, partition=Partition(0, 2))

    async def main() -> None:
        await exporter.export_rows(batch(4, *rooms))
        await exporter.close()

    run_in_new_loop(main())
    assert 0 < len(mine) < len(rooms)
    assert [i for i, _ in entries(shared_redis.client(), key)] == [
        f"hs.example/typing/master/4/{n}" for n in mine
    ]
    assert exporter.stats.skipped == len(rooms) - len(mine)
    assert exporter.stats.messages == len(mine)


# ====================================================================== NATS JetStream


@pytest.fixture(scope="module")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server -js for the tests that do not stop it (a subject each)."""
    if not nats_server_available():
        pytest.skip("needs nats-server")
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server -js for one test, which kills and restarts it."""
    if not nats_server_available():
        pytest.skip("needs nats-server")
    with NatsServer(tmp_path / "nats") as server:
        yield server


@asynccontextmanager
async def jetstream(server: NatsServer) -> AsyncIterator[Any]:
    """A JetStream context of a plain nats-py connection, to look at what was stored."""
    import nats

    nc = await nats.connect(server.url, allow_reconnect=False)
    try:
        yield nc.jetstream(timeout=5)
    finally:
        await nc.close()


async def read_back(server: NatsServer, subject: str, stream: str) -> list[tuple[str, bytes]]:
    """``(Nats-Msg-Id, data)`` of every message of ``stream``, through a pull consumer."""
    async with jetstream(server) as js:
        info = await js.stream_info(stream)
        total = info.state.messages
        consumer = await js.pull_subscribe(subject, durable="reader", stream=stream)
        got: list[tuple[str, bytes]] = []
        while len(got) < total:
            for msg in await consumer.fetch(total - len(got), timeout=5):
                got.append((msg.headers["Nats-Msg-Id"], msg.data))
                await msg.ack()
        return got


async def stored(server: NatsServer, stream: str) -> int:
    async with jetstream(server) as js:
        return int((await js.stream_info(stream)).state.messages)


@needs_nats
def test_jetstream_creates_the_stream_stores_in_order_and_exactly_once(
    shared_nats: NatsServer,
) -> None:
    subject = "export.created"
    sink = JetStreamSink(shared_nats.url, subject, duplicate_window=120, timeout=5)
    sent = messages(1, 3) + messages(2, 2)

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        await sink.open()
        async with jetstream(shared_nats) as js:
            name = await js.find_stream_name_by_subject(subject)
            info = await js.stream_info(name)
            seen["stream"] = (name, info.config.subjects, info.config.duplicate_window)
            seen["storage"] = getattr(info.config.storage, "value", info.config.storage)
        await sink.send(sent[:3])
        await sink.send(sent[3:])
        seen["stored"] = await stored(shared_nats, "export_created")
        # The same messages again (a crash between the ack and the checkpoint).
        await sink.send(sent[:3])
        await sink.send(sent)
        seen["again"] = (await stored(shared_nats, "export_created"), sink.duplicates)
        await sink.send(messages(3))
        seen["new"] = (await stored(shared_nats, "export_created"), sink.duplicates)
        seen["read"] = await read_back(shared_nats, subject, "export_created")
        await sink.close()
        return seen

    seen = run_in_new_loop(main())
    assert seen["stream"] == ("export_created", ["export.created"], 120.0)
    assert seen["storage"] == "file"
    assert seen["stored"] == 5
    assert seen["again"] == (5, 8), "nothing stored twice; every resend counted"
    assert seen["new"] == (6, 8)
    assert seen["read"] == [(m.id, m.data) for m in [*sent, *messages(3)]]


@needs_nats
def test_concurrent_opens_make_one_nats_connection(tmp_path: Path) -> None:
    """(The exporter's streams may each wait for the sink at once.)"""
    with NatsServer(tmp_path, monitor=True) as server:
        sink = JetStreamSink(server.url, "export.concurrent", timeout=5)

        async def main() -> tuple[int, int]:
            await asyncio.gather(*(sink.open() for _ in range(4)))
            during = server.connections()
            await sink.close()
            for _ in range(500):  # the server notices the close soon after
                if (after := server.connections()) == 0:
                    break
                await asyncio.sleep(0.01)
            return during, after

        assert run_in_new_loop(main()) == (1, 0)


@needs_nats
def test_jetstream_uses_a_stream_the_operator_made(shared_nats: NatsServer) -> None:
    sink = JetStreamSink(shared_nats.url, "ops.export", timeout=5)

    async def main() -> tuple[int, list[str]]:
        async with jetstream(shared_nats) as js:
            await js.add_stream(name="OPS", subjects=["ops.>"], duplicate_window=60)
        await sink.send(messages(1, 2))
        await sink.close()
        async with jetstream(shared_nats) as js:
            names = await js.streams_info()
        return await stored(shared_nats, "OPS"), [s.config.name for s in names]

    count, names = run_in_new_loop(main())
    assert count == 2
    assert "ops_export" not in names


@needs_nats
def test_jetstream_kill_and_restart_resume_and_store_nothing_twice(
    own_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL (file store, same directory): unavailable while down; the
    Exporter's retries then resend, and JetStream drops what it already had
    (the de-duplication window survives the restart).  nats-py's reconnect
    attempts are not logged as errors (the exporter warns, rate-limited)."""
    subject = "export.restart"
    sink = Observed(JetStreamSink(own_nats.url, subject, timeout=1))
    exporter = Exporter(sink, server_name=SERVER, backoff=quick_backoff())
    first, second = messages(1, 3), messages(2, 2)

    async def main() -> tuple[str, int, list[tuple[str, bytes]]]:
        await exporter.export("typing", "master", 1, first)
        own_nats.kill()
        with pytest.raises(SinkUnavailable) as e:
            await asyncio.wait_for(sink.sink.send(second), GUARD)
        task = asyncio.ensure_future(exporter.export("typing", "master", 2, first + second))
        await sink.next_failure()
        own_nats.start()
        await asyncio.wait_for(task, GUARD)
        count = await stored(own_nats, "export_restart")
        read = await read_back(own_nats, subject, "export_restart")
        await exporter.close()
        return str(e.value), count, read

    error, count, read = run_in_new_loop(main())
    assert error.startswith(f"nats://127.0.0.1:{own_nats.port}/{subject}: "), error
    assert count == 5
    assert read == [(m.id, m.data) for m in first + second]
    assert sink.sink.duplicates >= 3, "the first batch, sent again, was a duplicate"
    assert exporter.stats.sink_failures >= 1 and exporter.stats.sink_up
    assert [r.getMessage() for r in caplog.records if r.name.startswith("nats")] == []


@needs_nats
def test_a_nats_server_without_jetstream_is_unavailable_naming_jetstream(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "plain", jetstream=False) as plain:
        sink = JetStreamSink(plain.url, "export.nojs", timeout=2)

        async def main() -> str:
            try:
                with pytest.raises(SinkUnavailable) as e:
                    await asyncio.wait_for(sink.open(), GUARD)
                return str(e.value)
            finally:
                await sink.close()

        error = run_in_new_loop(main())
    assert error == (
        f"nats://127.0.0.1:{plain.port}/export.nojs: no JetStream here "
        "(is nats-server running with -js?)"
    )


@needs_nats
def test_no_nats_server_at_open_is_unavailable_within_the_timeout() -> None:
    port = free_port()
    sink = JetStreamSink(f"nats://127.0.0.1:{port}", "export.nobody", timeout=0.5)

    async def main() -> str:
        for _ in range(2):  # and again, as the exporter would
            with pytest.raises(SinkUnavailable) as e:
                await asyncio.wait_for(sink.open(), GUARD)
        with pytest.raises(SinkUnavailable):
            await asyncio.wait_for(sink.send(messages(1)), GUARD)
        await sink.close()
        return str(e.value)

    error = run_in_new_loop(main())
    assert error.startswith(f"nats://127.0.0.1:{port}/export.nobody: cannot connect: "), error
    assert "refused" in error or "111" in error


@needs_nats
def test_jetstream_refusals_are_rejected_not_retried(shared_nats: NatsServer) -> None:
    """A message above the stream's limit, one above the server's max payload,
    a stream name another stream holds: each refused for good."""

    async def main() -> list[str]:
        errors = []
        async with jetstream(shared_nats) as js:
            await js.add_stream(name="SMALL", subjects=["export.small"], max_msg_size=64)
            await js.add_stream(name="export_taken", subjects=["elsewhere"])
        big = messages(1, 1)[0]
        huge = ExportMessage(
            id="hs.example/typing/master/2/0",
            stream="typing",
            writer="master",
            token=2,
            key=None,
            body={},
            data=b"x" * (2 << 20),
        )
        for subject, batch_messages, call in (
            ("export.small", [big], "send"),
            ("export.huge", [huge], "send"),
            ("export.taken", [big], "open"),
        ):
            sink = JetStreamSink(shared_nats.url, subject, timeout=5)
            with pytest.raises(SinkRejected) as e:
                if call == "open":
                    await sink.open()
                else:
                    await sink.open()
                    await sink.send(batch_messages)
            errors.append(str(e.value))
            await sink.close()
        return errors

    small, huge, taken = run_in_new_loop(main())
    url = shared_nats.url
    assert small.startswith(f"{url}/export.small refused hs.example/typing/master/1/0: "), small
    assert "message size exceeds maximum allowed" in small
    assert huge.startswith(f"{url}/export.huge: hs.example/typing/master/2/0: "), huge
    assert "payload" in huge.lower()
    assert taken.startswith(f"{url}/export.taken: cannot create stream export_taken: "), taken
    assert "already in use" in taken


# ====================================================================== webhooks


class Receiver:
    """An aiohttp.web server on a loopback port: records each request and
    answers the next of ``answers`` (then 200); ``hang`` never answers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: list[tuple[int, dict[str, str]]] = []
        self.hang = False
        self.release = asyncio.Event()
        self._runner: Any = None
        self.port = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "body": await request.read(),
            }
        )
        if self.hang:
            await self.release.wait()
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        return web.Response(status=status, text=f"answer {status}", headers=headers)

    async def __aenter__(self) -> Self:
        from aiohttp import web

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self._runner.cleanup()


def test_a_webhook_batch_is_signed_and_keyed() -> None:
    secret = b"webhook-secret"
    sent = messages(1, 3)
    clock = 1_700_000_000.75

    async def main() -> list[dict[str, Any]]:
        async with Receiver() as receiver:
            sink = WebhookSink(receiver.url(), secret=secret, timeout=5, clock=lambda: clock)
            await sink.open()
            await sink.send(sent)
            await sink.send(sent)  # a resend: the same body, key and signature
            await sink.close()
            return receiver.requests

    first, again = run_in_new_loop(main())
    assert (first["method"], first["path"]) == ("POST", "/hook")
    headers, body = first["headers"], first["body"]
    assert json.loads(body) == {"messages": [m.body for m in sent]}
    assert body == batch_body(sent)
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == sent[0].id
    assert headers[TIMESTAMP_HEADER] == "1700000000"
    assert headers[SIGNATURE_HEADER] == signature(secret, "1700000000", body)
    # What a receiver in any language computes: HMAC-SHA256 of "TIMESTAMP.BODY".
    mac = hmac.new(secret, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], f"sha256={mac}")
    assert not hmac.compare_digest(
        headers[SIGNATURE_HEADER], signature(b"other", "1700000000", body)
    )
    assert again["body"] == body
    assert again["headers"]["Idempotency-Key"] == headers["Idempotency-Key"]
    assert again["headers"][SIGNATURE_HEADER] == headers[SIGNATURE_HEADER]


def test_an_unsigned_webhook_has_no_signature_headers() -> None:
    async def main() -> dict[str, Any]:
        async with Receiver() as receiver:
            sink = WebhookSink(receiver.url(), timeout=5)
            await sink.send(messages(1))
            await sink.close()
            return receiver.requests[0]

    request = run_in_new_loop(main())
    assert SIGNATURE_HEADER not in request["headers"]
    assert TIMESTAMP_HEADER not in request["headers"]
    assert request["headers"]["Idempotency-Key"] == messages(1)[0].id


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, SinkUnavailable),
        (502, SinkUnavailable),
        (503, SinkUnavailable),
        (429, SinkUnavailable),
        (408, SinkUnavailable),
        (400, SinkRejected),
        (401, SinkRejected),
        (404, SinkRejected),
        (413, SinkRejected),
    ],
)
def test_a_webhook_answer_decides_unavailable_or_rejected(
    status: int, error: type[Exception]
) -> None:
    async def main() -> tuple[str, str, int]:
        async with Receiver() as receiver:
            receiver.answers.append((status, {}))
            sink = WebhookSink(receiver.url(), timeout=5)
            with pytest.raises(error) as e:
                await sink.send(messages(1))
            await sink.send(messages(1))  # the same sink, once the receiver takes it
            await sink.close()
            return str(e.value), receiver.url(), len(receiver.requests)

    text, url, requests = run_in_new_loop(main())
    assert requests == 2
    if error is SinkUnavailable:
        assert text == f"{url} answered {status}: answer {status}"
    else:
        assert text == (
            f"{url} refused the batch at hs.example/typing/master/1/0: {status} answer {status}"
        )


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_webhook_redirect_is_refused_not_followed(status: int) -> None:
    """Followed, a 301/302/303 would be a GET without the body, and its 200
    an acknowledgement of messages the receiver never had."""

    async def main() -> tuple[str, list[dict[str, Any]]]:
        async with Receiver() as receiver:
            receiver.answers.append((status, {"Location": receiver.url("/elsewhere")}))
            sink = WebhookSink(receiver.url(), timeout=5)
            with pytest.raises(SinkRejected) as e:
                await sink.send(messages(1))
            await sink.close()
            return str(e.value), receiver.requests

    text, requests = run_in_new_loop(main())
    assert [r["path"] for r in requests] == ["/hook"]
    assert f": {status}, a redirect to http://127.0.0.1:" in text, text
    assert "/elsewhere" in text


def test_a_webhook_with_nobody_listening_is_unavailable() -> None:
    port = free_port()
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook", timeout=5)

    async def main() -> str:
        with pytest.raises(SinkUnavailable) as e:
            await asyncio.wait_for(sink.send(messages(1)), GUARD)
        await sink.close()
        return str(e.value)

    error = run_in_new_loop(main())
    assert error.startswith(f"http://127.0.0.1:{port}/hook: "), error


def test_a_webhook_that_never_answers_is_unavailable_within_the_timeout() -> None:
    async def main() -> tuple[str, int]:
        async with Receiver() as receiver:
            receiver.hang = True
            sink = WebhookSink(receiver.url(), timeout=0.5)
            with pytest.raises(SinkUnavailable) as e:
                await asyncio.wait_for(sink.send(messages(1)), GUARD)
            await sink.close()
            return str(e.value), receiver.port

    error, port = run_in_new_loop(main())
    assert error == f"http://127.0.0.1:{port}/hook: no answer within 0.5 s"


def test_the_exporter_resends_the_same_webhook_batch_until_it_is_taken() -> None:
    async def main() -> tuple[Exporter, list[dict[str, Any]]]:
        async with Receiver() as receiver:
            receiver.answers += [(503, {}), (502, {}), (429, {})]
            sink = WebhookSink(receiver.url(), secret=b"k", timeout=5)
            exporter = Exporter(sink, server_name=SERVER, backoff=quick_backoff())
            await asyncio.wait_for(exporter.export_rows(batch(3, "!a:hs", "!b:hs")), GUARD)
            await exporter.close()
            return exporter, receiver.requests

    exporter, requests = run_in_new_loop(main())
    assert len(requests) == 4
    assert len({r["body"] for r in requests}) == 1, "the same batch each time"
    assert {r["headers"]["Idempotency-Key"] for r in requests} == {"hs.example/typing/master/3/0"}
    assert exporter.stats.sink_failures == 3
    assert exporter.stats.sink_up and exporter.stats.messages == 2
