"""synrepl.export's pure parts: messages and their stable ids, partitions and
their handover, URLs, and the Exporter against an in-memory sink.

The sinks against real servers are in ``test_export_sinks.py``.  Coroutines
run on a loop of their own (:func:`asyncio_helpers.run_in_new_loop`): the
suite's main thread already runs Twisted's asyncio reactor.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from asyncio_helpers import run_in_new_loop
from hypothesis import given
from hypothesis import strategies as st

from synrepl.connection import ReconnectBackoff
from synrepl.events import EventFilter, EventsReceived, FullEvent, MissingEvent
from synrepl.export import (
    SINK_SCHEMES,
    Exporter,
    ExportMessage,
    ExportStopped,
    Handover,
    HandoverError,
    Partition,
    SinkRejected,
    SinkUnavailable,
    messages_of_events,
    messages_of_rows,
    parse_partition,
    sink_from_url,
)
from synrepl.export.jetstream import DEFAULT_DUPLICATE_WINDOW, JetStreamSink
from synrepl.export.redis_stream import DEFAULT_MAXLEN, RedisStreamSink
from synrepl.export.webhook import WebhookSink, batch_body, signature
from synrepl.positions import RowsReceived
from synrepl.sharding import event_persister_for_room, shard_index
from synrepl.streams import CurrentStateRow, EventRow, PresenceRow, TypingRow

SERVER = "hs.example"


def ev(event_id: str, room: str, type: str = "m.room.message") -> EventRow:
    return EventRow(event_id, room, type, None, None, None, None, False, False)


def message(stream: str, writer: str, token: int, key: str | None, n: int = 0) -> ExportMessage:
    """A bare message (the partitions look at its stream, writer, token and key only)."""
    body = {"id": f"{SERVER}/{stream}/{writer}/{token}/{n}"}
    return ExportMessage(
        id=body["id"],
        stream=stream,
        writer=writer,
        token=token,
        key=key,
        body=body,
        data=orjson.dumps(body),
    )


# ---------------------------------------------------------------- messages


def test_row_messages_have_stable_documented_ids_and_bodies() -> None:
    rows = (TypingRow("!a:hs", ("@u:hs",)), TypingRow("!b:hs", ()))
    batch = RowsReceived("typing", "typing-1", 42, rows, False)
    messages = messages_of_rows(SERVER, batch)
    assert [m.id for m in messages] == [
        "hs.example/typing/typing-1/42/0",
        "hs.example/typing/typing-1/42/1",
    ]
    first = messages[0]
    assert (first.stream, first.writer, first.token, first.key) == (
        "typing",
        "typing-1",
        42,
        "!a:hs",
    )
    assert first.body == {
        "id": "hs.example/typing/typing-1/42/0",
        "server": SERVER,
        "stream": "typing",
        "writer": "typing-1",
        "token": 42,
        "row": {"room_id": "!a:hs", "user_ids": ["@u:hs"]},
    }
    assert json.loads(first.data) == first.body
    # The same rows again (a resend after a crash, a refetch over HTTP): the same ids.
    again = messages_of_rows(SERVER, RowsReceived("typing", "typing-1", 42, rows, True))
    assert [m.id for m in again] == [m.id for m in messages]
    assert [m.data for m in again] == [m.data for m in messages]


def test_events_stream_rows_carry_their_kind() -> None:
    rows = (ev("$1", "!r:hs"), CurrentStateRow("!r:hs", "m.room.name", "", "$1"))
    messages = messages_of_rows(SERVER, RowsReceived("events", "persister-2", 9, rows, False))
    assert [m.body["kind"] for m in messages] == ["ev", "state"]
    assert [m.id for m in messages] == [
        "hs.example/events/persister-2/9/0",
        "hs.example/events/persister-2/9/1",
    ]
    assert [m.key for m in messages] == ["!r:hs", "!r:hs"]


def test_keep_selects_rows_without_changing_their_ids() -> None:
    rows = tuple(ev(f"${n}", f"!r{n}:hs") for n in range(5))
    batch = RowsReceived("events", "master", 3, rows, False)
    every = messages_of_rows(SERVER, batch)
    kept = messages_of_rows(SERVER, batch, keep=[1, 3])
    assert [m.id for m in kept] == ["hs.example/events/master/3/1", "hs.example/events/master/3/3"]
    assert [m.data for m in kept] == [every[1].data, every[3].data]
    assert messages_of_rows(SERVER, batch, keep=[]) == []


def test_event_messages_have_ids_by_event_id() -> None:
    events = (
        FullEvent(
            "$a",
            "!r:hs",
            "m.room.member",
            "@u:hs",
            state_key="@u:hs",
            content={"membership": "join"},
            origin_server_ts=1234,
        ),
        MissingEvent("$gone", None, None, "purged"),
    )
    batch = EventsReceived("events", "persister-1", 7, events, False)
    full, missing = messages_of_events(SERVER, batch)
    assert full.id == "hs.example/events/persister-1/7/$a"
    assert missing.id == "hs.example/events/persister-1/7/$gone"
    assert full.body == {
        "id": "hs.example/events/persister-1/7/$a",
        "server": SERVER,
        "stream": "events",
        "writer": "persister-1",
        "token": 7,
        "event_id": "$a",
        "room_id": "!r:hs",
        "type": "m.room.member",
        "sender": "@u:hs",
        "state_key": "@u:hs",
        "content": {"membership": "join"},
        "origin_server_ts": 1234,
        "unsigned": {},
        "redacts": None,
        "room_version": None,
        "rejected": False,
        "rejection_reason": None,
        "outlier": False,
        "redacted": False,
        "redacted_by": None,
    }
    assert json.loads(full.data) == full.body
    assert missing.body["missing"] == "purged"
    assert "sender" not in missing.body and "content" not in missing.body
    assert (full.key, missing.key) == ("!r:hs", None)
    # Ids do not depend on the events' places: the same event, the same id.
    alone = messages_of_events(SERVER, EventsReceived("events", "persister-1", 7, events[1:], True))
    assert [m.id for m in alone] == [missing.id]


def test_the_key_is_the_message_field_else_the_row_field_else_none() -> None:
    presence = PresenceRow("@u:hs", "online", 1, 2, 3, None, True)
    rows = RowsReceived("presence", "master", 5, (presence,), False)
    # No such field anywhere: None (the partitions then split on the writer).
    assert [m.key for m in messages_of_rows(SERVER, rows)] == [None]
    # A row field.
    assert [m.key for m in messages_of_rows(SERVER, rows, key_field="user_id")] == ["@u:hs"]
    # A message field (even when not a string: keys are strings).
    assert [m.key for m in messages_of_rows(SERVER, rows, key_field="writer")] == ["master"]
    assert [m.key for m in messages_of_rows(SERVER, rows, key_field="token")] == ["5"]
    event = FullEvent("$a", "!r:hs", "m.room.message", "@s:hs")
    batch = EventsReceived("events", "master", 5, (event,), False)
    assert [m.key for m in messages_of_events(SERVER, batch, key_field="sender")] == ["@s:hs"]
    assert [m.key for m in messages_of_events(SERVER, batch, key_field="nope")] == [None]


def test_webhook_body_and_signature_are_what_the_docs_say() -> None:
    rows = RowsReceived("typing", "master", 1, (TypingRow("!a:hs", ()),), False)
    messages = messages_of_rows(SERVER, rows)
    body = batch_body(messages)
    assert json.loads(body) == {"messages": [m.body for m in messages]}
    expected = hmac.new(b"key", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(b"key", "1700000000", body) == f"sha256={expected}"


# ---------------------------------------------------------------- partitions

KEYS = st.one_of(st.none(), st.text(min_size=1, max_size=12))
WRITERS = st.sampled_from(["master", "persister-1", "persister-2", "stream-writer"])


@given(
    st.lists(st.tuples(KEYS, WRITERS), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=9),
)
def test_exactly_one_partition_keeps_each_message(
    keys: list[tuple[str | None, str]], count: int
) -> None:
    messages = [message("s", writer, 1, key, n) for n, (key, writer) in enumerate(keys)]
    partitions = [Partition(i, count) for i in range(count)]
    for m in messages:
        assert sum(p.keeps(m) for p in partitions) == 1, m
    # Together, in order: every message once, each partition's share in order.
    shares = [p.select(messages) for p in partitions]
    assert sorted(m.id for share in shares for m in share) == sorted(m.id for m in messages)
    for share in shares:
        assert share == [m for m in messages if m in share]
    # One key, one partition, whichever writer wrote it (a room stays in order).
    owner: dict[str, int] = {}
    for m in messages:
        if m.key is not None:
            index = next(i for i, p in enumerate(partitions) if p.keeps(m))
            assert owner.setdefault(m.key, index) == index


@given(
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True),
    st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=10),
)
def test_a_room_goes_to_the_partition_of_its_event_persister(
    writers: list[str], rooms: list[str]
) -> None:
    partitions = [Partition(i, len(writers)) for i in range(len(writers))]
    for room in rooms:
        m = message("events", "any", 1, room)
        (index,) = [i for i, p in enumerate(partitions) if p.keeps(m)]
        assert writers[index] == event_persister_for_room(room, writers)


def test_a_message_without_key_goes_where_its_writer_hashes() -> None:
    for writer in ("master", "w1", "w2", "w3"):
        m = message("presence", writer, 1, None)
        (index,) = [i for i in range(3) if Partition(i, 3).keeps(m)]
        assert index == shard_index(writer, 3)


PAIRS = [("events", "p1"), ("events", "p2"), ("typing", "master"), ("receipts", "master")]
#: Written by nobody the old partitions had a position for (a new writer).
NEW_PAIR = ("events", "p3")


@st.composite
def handovers(draw: st.DrawFn) -> tuple[int, list[dict[str, dict[str, int]]], list[ExportMessage]]:
    old_count = draw(st.integers(min_value=1, max_value=5))
    pairs = draw(st.lists(st.sampled_from(PAIRS), min_size=1, unique=True))
    positions: list[dict[str, dict[str, int]]] = []
    for _ in range(old_count):
        p: dict[str, dict[str, int]] = {}
        for stream, writer in pairs:
            p.setdefault(stream, {})[writer] = draw(st.integers(min_value=0, max_value=10))
        positions.append(p)
    rooms = st.one_of(st.none(), st.sampled_from([f"!room{i}:hs" for i in range(12)]))
    raw = draw(
        st.lists(
            st.tuples(st.sampled_from([*pairs, NEW_PAIR]), st.integers(1, 12), rooms),
            max_size=60,
        )
    )
    messages = [message(s, w, token, key, n) for n, ((s, w), token, key) in enumerate(raw)]
    return old_count, positions, messages


@given(handovers(), st.integers(min_value=1, max_value=6))
def test_a_handover_exports_every_message_exactly_once(
    old: tuple[int, list[dict[str, dict[str, int]]], list[ExportMessage]], new_count: int
) -> None:
    old_count, positions, messages = old
    exported: Counter[str] = Counter()
    # What the old partitions exported: their own keys, up to their positions.
    for index, reached in enumerate(positions):
        share = Partition(index, old_count)
        for m in messages:
            if share.keeps(m) and m.token <= reached.get(m.stream, {}).get(m.writer, 0):
                exported[m.id] += 1
    # The new partitions, each started from Handover.start(): they see the
    # messages above it (all of a pair it has no position for).
    handover = Handover(positions)
    start = handover.start()
    for index in range(new_count):
        share = Partition(index, new_count, handover)
        for m in messages:
            if m.token > start.get(m.stream, {}).get(m.writer, 0) and share.keeps(m):
                exported[m.id] += 1
    assert {m.id: exported[m.id] for m in messages} == {m.id: 1 for m in messages}


def test_handover_start_is_the_lowest_position_of_the_old_partitions() -> None:
    handover = Handover(
        [
            {"events": {"p1": 10, "p2": 4}, "typing": {"master": 7}},
            {"events": {"p1": 3, "p2": 9}, "typing": {"master": 7}},
        ]
    )
    assert handover.start() == {"events": {"p1": 3, "p2": 4}, "typing": {"master": 7}}


def test_a_handover_refuses_an_old_partition_without_a_position_others_have() -> None:
    with pytest.raises(
        HandoverError, match="old partition 1 of 2 has no position for typing from master"
    ):
        Handover([{"events": {"p1": 3}, "typing": {"master": 1}}, {"events": {"p1": 4}}])
    with pytest.raises(
        HandoverError, match="old partition 0 of 3 has no position for events from p2"
    ):
        Handover(
            [{"events": {"p1": 1}}, {"events": {"p1": 1, "p2": 2}}, {"events": {"p2": 2, "p1": 1}}]
        )
    with pytest.raises(HandoverError, match="every old partition"):
        Handover([])


def test_parse_partition() -> None:
    assert parse_partition("0/3") == (0, 3)
    assert parse_partition("2/3") == (2, 3)
    assert parse_partition("0/1") == (0, 1)
    for bad in ("3/3", "-1/3", "1/0", "0/0", "a/b", "1", "", "/3", "1/", "1/2/3", "0.5/2"):
        with pytest.raises(ValueError, match=r"a partition is I/N, 0 <= I < N \(say 0/3\)") as e:
            parse_partition(bad)
        assert repr(bad) in str(e.value)
    assert Partition(1, 3).name == "partition-1-of-3"
    with pytest.raises(ValueError, match=r"the index must be 0\.\.2"):
        Partition(3, 3)
    with pytest.raises(ValueError):
        Partition(0, 0)


# ---------------------------------------------------------------- URLs


def test_redis_stream_urls() -> None:
    sink = sink_from_url("redis-stream://127.0.0.1:6390/export%2Fmain?db=3&maxlen=500")
    assert isinstance(sink, RedisStreamSink)
    assert (sink.url, sink.key, sink.maxlen, sink.timeout) == (
        "redis://127.0.0.1:6390/3",
        "export/main",
        500,
        10.0,
    )
    assert sink.target == "redis-stream://127.0.0.1:6390/export/main"
    plain = sink_from_url("redis-stream:///k")
    assert isinstance(plain, RedisStreamSink)
    assert (plain.url, plain.maxlen) == ("redis://127.0.0.1:6379/0", DEFAULT_MAXLEN)
    tls = sink_from_url("rediss-stream://user:s3cr3t@redis.example:6380/k", timeout=2)
    assert isinstance(tls, RedisStreamSink)
    assert tls.url == "rediss://user:s3cr3t@redis.example:6380/0"
    assert tls.timeout == 2
    assert tls.target == "redis-stream://redis.example:6380/k"


def test_nats_urls() -> None:
    sink = sink_from_url("nats://127.0.0.1:4223/export.events?stream=EXPORT&duplicate_window=60")
    assert isinstance(sink, JetStreamSink)
    assert (sink.servers, sink.subject, sink.stream, sink.duplicate_window, sink.timeout) == (
        "nats://127.0.0.1:4223",
        "export.events",
        "EXPORT",
        60.0,
        10.0,
    )
    assert sink.target == "nats://127.0.0.1:4223/export.events"
    plain = sink_from_url("nats:///a.b-c", timeout=3)
    assert isinstance(plain, JetStreamSink)
    assert (plain.servers, plain.stream, plain.duplicate_window, plain.timeout) == (
        "nats://127.0.0.1:4222",
        "a_b-c",
        DEFAULT_DUPLICATE_WINDOW,
        3,
    )


@pytest.mark.parametrize(
    "url", ["nats://user:s3cr3t@nats.example:4222/s", "nats://s3cr3t@nats.example:4222/s"]
)
def test_a_nats_target_never_shows_credentials(url: str) -> None:
    sink = sink_from_url(url)
    assert sink.target == "nats://nats.example:4222/s"
    assert isinstance(sink, JetStreamSink) and "s3cr3t" in sink.servers  # still used to connect


def test_webhook_urls() -> None:
    sink = sink_from_url("https://hooks.example:8443/in?token=abc", secret=b"k")
    assert isinstance(sink, WebhookSink)
    assert (sink.url, sink.secret, sink.timeout) == (
        "https://hooks.example:8443/in?token=abc",
        b"k",
        30.0,
    )
    assert sink.target == "https://hooks.example:8443/in"
    quick = sink_from_url("http://127.0.0.1/hook", timeout=2)
    assert isinstance(quick, WebhookSink)
    assert (quick.secret, quick.timeout) == (None, 2)


def test_every_scheme_is_known() -> None:
    assert set(SINK_SCHEMES) == {"redis-stream", "rediss-stream", "nats", "http", "https"}


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("kafka://broker/topic", "the URL starts with one of redis-stream://, rediss-stream://"),
        ("127.0.0.1:6379/k", "the URL starts with one of"),
        ("redis-stream://127.0.0.1:6379/", "say which key: redis-stream://host:port/KEY"),
        ("redis-stream://127.0.0.1:6379", "say which key"),
        ("nats://127.0.0.1:4222/", "say which subject: nats://host:port/SUBJECT"),
        ("nats://127.0.0.1:4222/a.*", "no spaces or wildcards"),
        ("nats://h/s?stream=EXPORT.events", "a JetStream stream name has no spaces, '\\.'"),
        (
            "redis-stream://h/k?maxlen=10&colour=red",
            "unknown option 'colour' in .* \\(known: db, maxlen\\)",
        ),
        (
            "nats://h/s?maxlen=1",
            "unknown option 'maxlen' in .* \\(known: stream, duplicate_window\\)",
        ),
        ("redis-stream://h/k?maxlen=lots", "maxlen in .* must be a number, got 'lots'"),
        ("redis-stream://h/k?maxlen=", "maxlen in .* must be a number, got ''"),
        ("redis-stream://h/k?db=one", "db in .* must be a number, got 'one'"),
        ("redis-stream://h/k?db=-1", "db in .* must be a number >= 0, got '-1'"),
        ("redis-stream://h/k?maxlen=0", "maxlen must be at least 1"),
        ("nats://h/s?duplicate_window=soon", "duplicate_window in .* must be a number, got 'soon'"),
        ("nats://h/s?duplicate_window=nan", "duplicate_window in .* must be a number >= 0"),
        ("nats://h/s?duplicate_window=-5", "duplicate_window in .* must be a number >= 0"),
        ("redis-stream://h:sixty/k", "the port in .* must be a number"),
        ("nats://h:99999/s", "the port in .* must be a number"),
        ("http://user:pw@h/hook", "a webhook URL must not carry credentials"),
        ("http:///hook", "a webhook URL is http\\(s\\)://host\\[:port\\]/path"),
    ],
)
def test_bad_urls(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        sink_from_url(url)


def test_a_signing_secret_is_for_webhooks_only() -> None:
    for url in ("redis-stream://h/k", "nats://h/s"):
        with pytest.raises(ValueError, match="a signing secret is for webhooks"):
            sink_from_url(url, secret=b"k")


@pytest.mark.parametrize(
    "url",
    [
        "kafka://user:s3cr3t@broker/topic",
        "redis-stream://:s3cr3t@h:6379/",
        "redis-stream://user:s3cr3t@h:6379/k?maxlen=lots",
        "redis-stream://user:s3cr3t@h:6379/k?colour=red",
        "redis-stream://:p@s3cr3t:x@h:6379/k?db=x",
        "rediss-stream://user:s3cr3t@h:port/k",
        "nats://s3cr3t@h:4222/",
        "nats://user:s3cr3t@h:4222/s?duplicate_window=soon",
        "http://user:s3cr3t@h/hook",
    ],
)
def test_a_password_is_never_shown_in_an_error(url: str) -> None:
    with pytest.raises(ValueError) as e:
        sink_from_url(url)
    assert "s3cr3t" not in str(e.value)
    assert "s3cr3t" not in repr(e.value)


# ---------------------------------------------------------------- the Exporter, in memory


class MemorySink:
    """A sink in memory: fails ``down`` attempts (open or send) with
    SinkUnavailable, refuses with SinkRejected while ``refuse`` is set."""

    target = "memory://test"

    def __init__(self, down: int = 0) -> None:
        self.down = down
        self.refuse = False
        self.opened = 0
        self.closed = 0
        self.attempts = 0
        self.stored: list[ExportMessage] = []
        self.calls: list[list[str]] = []
        self.attempted = asyncio.Event()

    async def open(self) -> None:
        self.opened += 1

    async def send(self, messages: Sequence[ExportMessage]) -> None:
        self.attempts += 1
        self.attempted.set()
        if self.refuse:
            raise SinkRejected("memory://test refused it")
        if self.down:
            self.down -= 1
            raise SinkUnavailable("memory://test: down")
        self.calls.append([m.id for m in messages])
        self.stored.extend(messages)

    async def close(self) -> None:
        self.closed += 1


def quick_backoff() -> ReconnectBackoff:
    return ReconnectBackoff(min_delay=0.001, max_delay=0.005)


def typing_batch(token: int, *rooms: str, writer: str = "master") -> RowsReceived:
    return RowsReceived("typing", writer, token, tuple(TypingRow(r, ()) for r in rooms), False)


def test_the_exporter_sends_each_batch_in_order_and_counts() -> None:
    async def main() -> tuple[MemorySink, Exporter]:
        sink = MemorySink()
        exporter = Exporter(sink, server_name=SERVER)
        await exporter.export_rows(typing_batch(1, "!a", "!b"))
        await exporter.export_rows(typing_batch(2, "!c"))
        await exporter.export_rows(typing_batch(3))  # nothing to send
        return sink, exporter

    sink, exporter = run_in_new_loop(main())
    assert sink.calls == [
        ["hs.example/typing/master/1/0", "hs.example/typing/master/1/1"],
        ["hs.example/typing/master/2/0"],
    ]
    assert sink.opened == 1
    stats = exporter.stats
    assert (stats.messages, stats.batches, stats.skipped, stats.sink_failures) == (3, 2, 0, 0)
    assert stats.sink_up and stats.waiting_since is None
    assert stats.acknowledged == {"typing": {"master": 3}}
    assert exporter.behind() == 0.0


def test_the_exporter_retries_a_sink_that_is_down_and_reopens_it() -> None:
    now = [100.0]

    async def main() -> tuple[MemorySink, Exporter, list[Any]]:
        sink = MemorySink(down=3)
        exporter = Exporter(sink, server_name=SERVER, backoff=quick_backoff(), clock=lambda: now[0])
        seen: list[Any] = []
        task = asyncio.ensure_future(exporter.export_rows(typing_batch(5, "!a")))
        while sink.attempts < 2:
            sink.attempted.clear()
            await sink.attempted.wait()
        now[0] = 107.5
        seen.append((exporter.stats.sink_up, exporter.behind(), exporter.stats.acknowledged.copy()))
        await task
        return sink, exporter, seen

    sink, exporter, seen = run_in_new_loop(main())
    assert seen == [(False, 7.5, {})]
    assert sink.calls == [["hs.example/typing/master/5/0"]]
    assert sink.attempts == 4
    assert sink.opened == 4, "open() again after each failure"
    stats = exporter.stats
    assert (stats.sink_failures, stats.messages, stats.batches) == (3, 1, 1)
    assert stats.sink_up and stats.waiting_since is None and exporter.behind() == 0.0
    assert stats.acknowledged == {"typing": {"master": 5}}


def test_a_refusal_is_the_handlers_failure_not_retried() -> None:
    async def main() -> tuple[MemorySink, Exporter]:
        sink = MemorySink()
        sink.refuse = True
        exporter = Exporter(sink, server_name=SERVER, backoff=quick_backoff())
        with pytest.raises(SinkRejected, match="refused it"):
            await exporter.export_rows(typing_batch(5, "!a"))
        return sink, exporter

    sink, exporter = run_in_new_loop(main())
    assert sink.attempts == 1
    assert exporter.stats.sink_failures == 0
    assert exporter.stats.acknowledged == {}


def test_closing_the_exporter_stops_a_batch_waiting_for_the_sink() -> None:
    async def main() -> tuple[MemorySink, Exporter]:
        sink = MemorySink(down=10**9)
        exporter = Exporter(
            sink, server_name=SERVER, backoff=ReconnectBackoff(min_delay=30, max_delay=60)
        )
        task = asyncio.ensure_future(exporter.export_rows(typing_batch(5, "!a")))
        await sink.attempted.wait()
        await exporter.close()  # the exporter waits 15-30 s before its next try: no more
        with pytest.raises(ExportStopped, match="stopped while memory://test was down"):
            await task
        return sink, exporter

    sink, exporter = run_in_new_loop(main())
    assert sink.attempts == 1
    assert exporter.stats.acknowledged == {}
    assert not exporter.stats.sink_up


def test_a_partition_sends_its_share_and_counts_the_rest() -> None:
    rooms = [f"!room{i}:hs" for i in range(20)]
    mine = [r for r in rooms if shard_index(r, 3) == 1]

    async def main() -> tuple[MemorySink, Exporter]:
        sink = MemorySink()
        exporter = Exporter(sink, server_name=SERVER, partition=Partition(1, 3))
        await exporter.export_rows(typing_batch(1, *rooms))
        await exporter.export_rows(typing_batch(2, *[r for r in rooms if r not in mine]))
        return sink, exporter

    sink, exporter = run_in_new_loop(main())
    assert 0 < len(mine) < len(rooms)
    assert [m.key for m in sink.stored] == mine
    assert [m.id for m in sink.stored] == [
        f"hs.example/typing/master/1/{rooms.index(r)}" for r in mine
    ]
    assert sink.calls and len(sink.calls) == 1, "nothing to send: no send"
    assert exporter.stats.skipped == 2 * len(rooms) - 2 * len(mine)
    assert exporter.stats.acknowledged == {"typing": {"master": 2}}


def test_an_event_filter_keeps_matching_rows_with_their_ids() -> None:
    rows = (ev("$1", "!a:hs"), ev("$2", "!b:hs"), ev("$3", "!a:hs", "m.room.topic"))

    async def main() -> MemorySink:
        sink = MemorySink()
        exporter = Exporter(sink, server_name=SERVER)
        only_a = EventFilter(rooms=["!a:hs"])
        await exporter.export_rows(RowsReceived("events", "p1", 4, rows, False), filter=only_a)
        # Other streams' rows all pass.
        await exporter.export_rows(typing_batch(2, "!b:hs"), filter=only_a)
        return sink

    sink = run_in_new_loop(main())
    assert [m.id for m in sink.stored] == [
        "hs.example/events/p1/4/0",
        "hs.example/events/p1/4/2",
        "hs.example/typing/master/2/0",
    ]


def test_the_exporter_exports_full_events() -> None:
    events = (FullEvent("$a", "!r:hs", "m.room.message", "@u:hs", content={"body": "hi"}),)

    async def main() -> MemorySink:
        sink = MemorySink()
        exporter = Exporter(sink, server_name=SERVER)
        await exporter.export_events(EventsReceived("events", "p1", 8, events, False))
        return sink

    sink = run_in_new_loop(main())
    assert [m.id for m in sink.stored] == ["hs.example/events/p1/8/$a"]
    assert sink.stored[0].body["content"] == {"body": "hi"}


class GatedSink(MemorySink):
    """Holds every send until ``gate`` is set; counts the sends in progress."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.active = 0
        self.most_active = 0

    async def send(self, messages: Sequence[ExportMessage]) -> None:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            self.attempted.set()
            await self.gate.wait()
            self.stored.extend(messages)
        finally:
            self.active -= 1


def test_the_exporter_never_calls_the_sink_concurrently() -> None:
    """Two streams' batches at once (streams do not wait for each other):
    the sink still sees one send at a time, and one connection."""

    async def main() -> GatedSink:
        sink = GatedSink()
        exporter = Exporter(sink, server_name=SERVER)
        typing = asyncio.ensure_future(exporter.export_rows(typing_batch(1, "!a")))
        receipts = asyncio.ensure_future(
            exporter.export("receipts", "master", 1, [message("receipts", "master", 1, "!b")])
        )
        await sink.attempted.wait()
        for _ in range(10):  # let the other stream's batch run as far as it can
            await asyncio.sleep(0)
        sink.gate.set()
        await asyncio.gather(typing, receipts)
        return sink

    sink = run_in_new_loop(main())
    assert (sink.most_active, sink.opened) == (1, 1)


def test_an_event_with_a_huge_integer_still_makes_a_message() -> None:
    """orjson refuses integers beyond 64 bits and lone surrogates (old rooms
    allow both): the message is then ASCII-escaped JSON, the same values."""
    content = {"n": 2**70, "s": "\ud800 lone", "text": "caf\u00e9"}
    event = FullEvent("$a", "!r:hs", "m.room.message", "@u:hs", content=content)
    (m,) = messages_of_events(SERVER, EventsReceived("events", "p1", 1, (event,), False))
    assert json.loads(m.data)["content"] == content


def test_a_missing_export_extra_is_told_when_the_url_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without nats-py or aiohttp (the export extra), sink_from_url fails at
    once (the CLI says which package to install), not at the first batch."""
    monkeypatch.setitem(sys.modules, "nats", None)
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    with pytest.raises(ImportError) as nats_missing:
        sink_from_url("nats://127.0.0.1:4222/a.b")
    with pytest.raises(ImportError) as aiohttp_missing:
        sink_from_url("https://hooks.example/x")
    assert (nats_missing.value.name, aiohttp_missing.value.name) == ("nats", "aiohttp")


def test_close_lets_a_send_under_way_finish_before_closing_the_sink() -> None:
    """A clean stop during a send: the send completes (acknowledged, so the
    client checkpoints it and it is not sent again), then the sink closes."""

    async def main() -> tuple[GatedSink, bool, bool]:
        sink = GatedSink()
        exporter = Exporter(sink, server_name=SERVER)
        sending = asyncio.ensure_future(exporter.export_rows(typing_batch(1, "!a")))
        await sink.attempted.wait()
        closing = asyncio.ensure_future(exporter.close())
        for _ in range(10):
            await asyncio.sleep(0)
        closed_early = closing.done()
        sink.gate.set()
        await sending  # no ExportStopped: it was acknowledged
        await closing
        return sink, closed_early, exporter.stats.acknowledged == {"typing": {"master": 1}}

    sink, closed_early, acknowledged = run_in_new_loop(main())
    assert not closed_early and acknowledged and sink.closed == 1
    assert [m.id for m in sink.stored] == ["hs.example/typing/master/1/0"]
