"""The examples of docs/testing.md, each a test: from a unit test of a
handler to a property test of a whole worker.  The docs show these bodies;
tests/test_docs_snippets.py checks that they still match."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synrepl.positions import RowsReceived
from synrepl.streams import EventRow
from synrepl.testing import strategies as rs
from synrepl.testing.asyncio_clock import AsyncioVirtualTime
from synrepl.testing.clock import StuckError, VirtualTime
from synrepl.testing.homeserver import FakeHomeserver
from synrepl.testing.traffic import Traffic
from synrepl.twisted.client import ReplicationClient

# --8<-- [start:worker]


class MessageLog:
    """The worker under test: an audit log of every message, once."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, str, str]] = []

    def on_rows(self, batch: RowsReceived) -> None:
        for row in batch.rows:
            if isinstance(row, EventRow) and row.type == "m.room.message":
                self.entries.append((batch.token, row.room_id, row.event_id))


# --8<-- [end:worker]
# --8<-- [start:unit]


def test_the_log_keeps_messages_only() -> None:
    log = MessageLog()
    message = EventRow(
        "$m", "!r:example.com", "m.room.message", None, None, None, None, False, False
    )
    topic = EventRow("$t", "!r:example.com", "m.room.topic", "", None, None, None, False, False)
    log.on_rows(RowsReceived("events", "persister1", 7, (message, topic), False))
    assert log.entries == [(7, "!r:example.com", "$m")]


# --8<-- [end:unit]
# --8<-- [start:property]


@given(st.lists(rs.event_rows(), max_size=20))
def test_the_log_keeps_every_message_and_nothing_else(rows: list[EventRow]) -> None:
    log = MessageLog()
    log.on_rows(RowsReceived("events", "persister1", 7, tuple(rows), False))
    assert [e[2] for e in log.entries] == [r.event_id for r in rows if r.type == "m.room.message"]


# --8<-- [end:property]
# --8<-- [start:fixtures]


def test_the_worker_logs_what_the_homeserver_writes(
    synrepl_time: VirtualTime,
    synrepl_homeserver: FakeHomeserver,
    synrepl_client: ReplicationClient,
    synrepl_published: list[tuple[str, str]],
) -> None:
    log = MessageLog()
    synrepl_client.on_rows("events", log.on_rows)
    first = EventRow("$m1", "!r:test.local", "m.room.message", None, None, None, None, False, False)
    lost = EventRow("$m2", "!r:test.local", "m.room.message", None, None, None, None, False, False)
    token = synrepl_homeserver.write("events", [first], writer="persister1")
    synrepl_homeserver.write_silently("events", [lost], writer="persister1")  # lost on the wire
    synrepl_homeserver.position("events", writer="persister1")  # reveals it: fetched over "HTTP"
    synrepl_time.run(synrepl_client.wait_for_stream_position("events", "persister1", token + 1))
    assert log.entries == [(token, "!r:test.local", "$m1"), (token + 1, "!r:test.local", "$m2")]
    assert synrepl_published[0] == ("test.local", "REPLICATE ")  # as Synapse writes it


# --8<-- [end:fixtures]
# --8<-- [start:traffic]


@settings(max_examples=25, deadline=None)
@given(rs.traffic(streams=["events"]))
def test_the_worker_logs_every_message_once_whatever_the_traffic(script: Traffic) -> None:
    time = VirtualTime()

    async def scenario() -> None:
        hs = await time.homeserver(writers=script.writers)
        client = time.client(hs)
        log = MessageLog()
        client.on_rows("events", log.on_rows)
        await client.start()
        await client.wait_ready()
        expected = await script.play(hs, time)
        for (stream, writer), rows in expected.items():
            if rows:
                await client.wait_for_stream_position(stream, writer, rows[-1][0])
        wanted = sorted(
            (token, row[1][1], row[1][0])
            for rows in expected.values()
            for token, row in rows
            if row[1][2] == "m.room.message"
        )
        assert sorted(log.entries) == wanted
        await client.stop()
        await hs.stop()

    time.run(scenario())


# --8<-- [end:traffic]
# --8<-- [start:outage]


def test_a_minute_of_redis_outage_in_no_time() -> None:
    time = VirtualTime()
    hs = time.run(time.homeserver(writers=("master", "persister1")))
    client = time.client(hs)
    log = MessageLog()
    client.on_rows("events", log.on_rows)
    time.run(client.start())
    time.run(client.wait_ready())
    time.redis.kill()  # Redis down: what is written now is lost on the wire
    message = EventRow(
        "$m", "!r:test.local", "m.room.message", None, None, None, None, False, False
    )
    token = hs.write("events", [message], writer="persister1")
    time.run(time.sleep(60))  # a minute passes, in no time
    time.redis.start()  # the client reconnects, sends REPLICATE, fetches the row
    time.run(client.wait_for_stream_position("events", "persister1", token))
    assert log.entries == [(token, "!r:test.local", "$m")]
    assert client.transport.stats.reconnects == 1  # the subscriber came back once


# --8<-- [end:outage]
# --8<-- [start:asyncio]


def test_the_same_on_asyncio() -> None:
    time = AsyncioVirtualTime()

    async def scenario() -> None:
        hs = await time.homeserver(writers=("master", "persister1"))
        client = time.client(hs)  # synrepl.asyncio.ReplicationClient
        log = MessageLog()
        client.on_rows("events", log.on_rows)
        await client.start()
        await client.wait_ready()
        time.redis.kill()
        message = EventRow(
            "$m", "!r:test.local", "m.room.message", None, None, None, None, False, False
        )
        token = hs.write("events", [message], writer="persister1")
        await asyncio.sleep(60)  # virtual: returns at once
        time.redis.start()
        await client.wait_for_stream_position("events", "persister1", token)
        assert log.entries == [(token, "!r:test.local", "$m")]
        assert asyncio.get_running_loop().time() >= 60
        await client.stop()
        await hs.stop()

    time.run(scenario())


# --8<-- [end:asyncio]


def test_a_virtual_loop_waiting_for_nothing_says_so() -> None:
    time = AsyncioVirtualTime()

    async def forever() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(StuckError, match="nothing on the loop"):
        time.run(forever())


def test_virtual_time_waiting_for_nothing_says_so() -> None:
    from twisted.internet import defer

    with pytest.raises(StuckError, match="nothing on the clock"):
        VirtualTime().run(_wait_for(defer.Deferred()))


async def _wait_for(d: object) -> None:
    await d  # type: ignore[misc]


def test_a_typing_writer_restart_is_a_reset_not_a_loss() -> None:
    """SimulatedWriters.restart(): typing starts again from 0; the client
    reports a StreamReset and delivers the new rows."""
    from synrepl.positions import StreamReset
    from synrepl.streams import TypingRow

    time = VirtualTime()
    hs = time.run(time.homeserver())
    client = time.client(hs)
    resets: list[object] = []
    typing: list[int] = []
    client.on_reset(resets.append)
    client.on_rows("typing", lambda batch: typing.append(batch.token))
    time.run(client.start())
    time.run(client.wait_ready())
    for n in range(5):
        hs.write("typing", [TypingRow(f"!r{n}:test.local", ("@a:test.local",))])
    time.run(client.wait_for_stream_position("typing", "master", 5))
    hs.restart("master")
    token = hs.write("typing", [TypingRow("!r:test.local", ())])
    time.run(time.sleep(1))
    assert resets == [StreamReset("typing", "master", 5, 0)]
    assert typing == [1, 2, 3, 4, 5, token] and token == 1
