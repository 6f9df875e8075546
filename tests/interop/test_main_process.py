"""synrepl against one real Synapse main process (SQLite, Redis).

Scenarios 1-4 of the interop suite: joining (a POSITION for every stream,
every row typed), the typed rows each client-API action produces, offline
catch-up from a saved position map, and USER_SYNC / CLEAR_USER_SYNC as seen
through Synapse's own presence API.

Every test compares what synrepl delivered with what Synapse published, as
captured by an independent redis-py subscriber (``Observation``): the same
rows, typed, under the same writer and token, once each.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from client_helpers import make_client, sleep, wait_until
from harness import Deployment, installed_synapse_version, release_facts, synapse_streams
from matrix_api import Api, User
from redis_server import RedisServer
from repl import Observation, Recorder, every, start_client

from synrepl.config import load_config
from synrepl.streams import (
    STREAM_NAMES,
    AccountDataRow,
    CurrentStateRow,
    DeviceListsEntityRow,
    DeviceListsRow,
    EventRow,
    PresenceRow,
    ProfileUpdatesRow,
    PushRulesRow,
    ReceiptsRow,
    ToDeviceRow,
    TypingRow,
)
from synrepl.twisted.client import NotReadyError

pytestmark = pytest.mark.main_only

MASTER = {"master"}


def _now_ms() -> int:
    return int(time.time() * 1000)


_users = iter(range(10**6))


async def new_user(api: Api, name: str) -> User:
    return await api.register(f"{name}{next(_users)}x{int(time.time() * 1000) % 10**8}")


def event_rows(rec: Recorder, room_id: str) -> list[EventRow]:
    return rec.rows("events", EventRow, where=lambda r: r.room_id == room_id)


def state_rows(rec: Recorder, room_id: str) -> list[CurrentStateRow]:
    return rec.rows("events", CurrentStateRow, where=lambda r: r.room_id == room_id)


def expected_event(event: dict[str, Any], relates_to: str | None = None) -> EventRow:
    """The ``ev`` row Synapse publishes for an event of a local room, from
    the event as the client API returns it."""
    content = event.get("content", {})
    return EventRow(
        event["event_id"],
        event["room_id"],
        event["type"],
        event.get("state_key"),
        event.get("redacts") or content.get("redacts"),
        relates_to,
        content.get("membership") if event["type"] == "m.room.member" else None,
        False,
        False,
    )


# ---------------------------------------------------------------- scenario 1


@pytest_twisted.ensureDeferred
async def test_join_gets_a_position_for_every_stream_of_this_synapse(
    main_only: Deployment, main_redis: RedisServer, adapter: str
) -> None:
    """A ReplicationClient that joins gets a POSITION from the main process
    for every stream the Synapse release under test has (19 in 1.163.2: the
    main process here also writes ``federation``), synrepl knows every one of
    them by name, and synrepl.releases says that release has exactly those."""
    streams_map = synapse_streams()  # the release's own list, from its interpreter

    observation = Observation(
        load_config(*main_only.config_files["master"]), main_redis.port, adapter=adapter
    )
    await observation.start(every(streams_map, MASTER))
    try:
        assert set(streams_map) <= set(STREAM_NAMES)
        assert set(streams_map) == release_facts().streams
        answered = {(s, w) for s, w, _, _ in observation.tap.positions()}
        assert answered >= {(s, "master") for s in streams_map}
        positions = observation.client.positions()  # type: ignore[union-attr]
        assert set(positions) == set(streams_map)

        # Each stream is at the token the writer last announced: a POSITION's
        # new token, or a later row's (presence moves on its own, with the
        # timeouts of users earlier tests made).  The tap reads in a thread
        # of its own and may be behind the client: give it time.
        def agree() -> bool:
            current = observation.client.positions()  # type: ignore[union-attr]
            newest = observation.tap.announced()
            return all(w == {"master": newest.get((s, "master"))} for s, w in current.items())

        await wait_until(agree, timeout=10, what="positions as announced")
    finally:
        await observation.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_told_its_release_follows_that_release_streams(
    main_only: Deployment, adapter: str
) -> None:
    """The HTTP client finds the release from the Server header; a client
    told that release follows exactly its streams and becomes ready, while
    a client left to the newest's streams is kept waiting by precisely the
    streams this release lacks (none on the newest), and says which."""
    from synrepl.releases import SynapseRelease

    config = load_config(*main_only.config_files["master"])
    release = SynapseRelease.parse(installed_synapse_version())
    # Not read-only: their REPLICATE makes the writers announce every stream.
    told = make_client(adapter, config, release=release)
    untold = make_client(adapter, config)
    try:
        assert await told.http.detect_release("master") == release
        await told.start()
        await told.wait_ready(30)
        assert set(told.positions()) == release_facts().streams
        await untold.start()
        lacking = set(STREAM_NAMES) - release_facts().streams
        try:
            await untold.wait_ready(10)
        except NotReadyError as e:
            assert set(e.silent) == lacking, e
        else:
            assert lacking == set()
    finally:
        for client in (told, untold):
            await client.stop()
            await client.http.close()


# ---------------------------------------------------------------- scenario 2


@pytest_twisted.ensureDeferred
async def test_register_login_profile_and_push_rules(api: Api, obs: Observation) -> None:
    """register and login -> device_lists (the row of the release under test:
    two fields before 1.110); a display name change -> profile_updates (from
    1.159) and a new membership event; a push rule -> push_rules."""
    rec = obs.rec
    facts = release_facts()
    alice = await new_user(api, "alice")
    if facts.device_lists_fields == DeviceListsEntityRow.FIELDS:
        alices: Any = DeviceListsEntityRow(alice.user_id, False)

        def of_alice(r: Any) -> bool:
            return bool(r.entity == alice.user_id)
    else:
        alices = DeviceListsRow(alice.user_id, False, False)

        def of_alice(r: Any) -> bool:
            return bool(r.user_id == alice.user_id)

    (registered,) = await rec.wait_for(
        "device_lists row for the registration", "device_lists", where=of_alice
    )
    assert registered == alices

    await api.login(alice.user_id, alice.password)
    rows = await rec.wait_for(
        "device_lists row for the login", "device_lists", where=of_alice, count=2
    )
    assert rows == [alices] * 2

    room = await alice.create_room(name="profile")
    await alice.set_displayname("Alice Interop")
    if "profile_updates" in facts.streams:
        (profile,) = await rec.wait_for(
            "profile_updates row", "profile_updates", where=lambda r: r.user_id == alice.user_id
        )
        assert profile == ProfileUpdatesRow(alice.user_id, "update", ("displayname",))
    members = await rec.wait_for(
        "the member event with the new display name",
        "events",
        EventRow,
        where=lambda r: r.room_id == room and r.type == "m.room.member",
        count=2,
    )
    timeline = await alice.messages(room)
    renamed = [e for e in timeline if e["type"] == "m.room.member"][-1]
    assert renamed["content"]["displayname"] == "Alice Interop"
    assert members[-1] == expected_event(renamed)

    await alice.set_push_rule("interop", "cake")
    (rule,) = await rec.wait_for(
        "push_rules row", "push_rules", where=lambda r: r.user_id == alice.user_id
    )
    assert rule == PushRulesRow(alice.user_id)
    await obs.assert_matches_wire()


@pytest_twisted.ensureDeferred
async def test_room_timeline_rows(api: Api, obs: Observation) -> None:
    """create room, join, message, edit, redaction, state change: one ``ev``
    row per event, exactly as the client API reports the event, and a
    ``state`` row for each state event."""
    rec = obs.rec
    alice, bob = await new_user(api, "alice"), await new_user(api, "bob")
    room = await alice.create_room(preset="public_chat", name="timeline")
    initial_state = await alice.state(room)
    await bob.join(room)
    message = await alice.message(room, "hello")
    edit = await alice.edit(room, message, "hello, world")
    redaction = await alice.redact(room, message)
    topic = await alice.set_state(room, "m.room.topic", {"topic": "interop"})
    final_state = await alice.state(room)
    timeline = await alice.messages(room)
    by_id = {e["event_id"]: e for e in timeline}
    assert {message, edit, redaction, topic} <= set(by_id)

    await rec.wait_for(
        "an ev row for every event",
        "events",
        EventRow,
        where=lambda r: r.room_id == room,
        count=len(timeline),
    )
    await rec.wait_for(
        "a state row for every state change",
        "events",
        CurrentStateRow,
        where=lambda r: r.room_id == room,
        count=len(initial_state) + 2,
    )
    relations = {edit: message}
    expected = [expected_event(e, relations.get(e["event_id"])) for e in timeline]
    assert event_rows(rec, room) == expected
    # Spot checks of the fields each action is about.
    rows = {r.event_id: r for r in event_rows(rec, room)}
    assert rows[edit].relates_to == message
    assert rows[redaction].redacts == message and rows[redaction].type == "m.room.redaction"
    assert rows[topic].state_key == "" and rows[topic].type == "m.room.topic"
    joined = [r for r in rows.values() if r.state_key == bob.user_id]
    assert [(r.type, r.membership) for r in joined] == [("m.room.member", "join")]
    # One state row per state event, naming it (Synapse orders the state rows
    # of one token its own way); the last one per key is the room's state now.
    state_events = [e for e in timeline if "state_key" in e]
    assert Counter(state_rows(rec, room)) == Counter(
        CurrentStateRow(room, e["type"], e["state_key"], e["event_id"]) for e in state_events
    )
    latest = {}
    for batch in rec.batches:
        for r in batch.rows:
            if isinstance(r, CurrentStateRow) and r.room_id == room:
                latest[(r.type, r.state_key)] = r.event_id
    assert latest == {(e["type"], e["state_key"]): e["event_id"] for e in final_state}
    await obs.assert_matches_wire()


@pytest_twisted.ensureDeferred
async def test_ephemeral_rows(api: Api, obs: Observation) -> None:
    """typing (start and stop), a read receipt, presence and a to-device message."""
    rec = obs.rec
    alice, bob = await new_user(api, "alice"), await new_user(api, "bob")
    room = await alice.create_room(preset="public_chat")
    await bob.join(room)
    message = await alice.message(room, "read me")

    await alice.typing(room, True)
    await alice.typing(room, False)
    typing = await rec.wait_for("typing rows", "typing", where=lambda r: r.room_id == room, count=2)
    assert typing == [TypingRow(room, (alice.user_id,)), TypingRow(room, ())]

    before = _now_ms()
    await bob.receipt(room, message)
    (receipt,) = await rec.wait_for("receipts row", "receipts", where=lambda r: r.room_id == room)
    assert receipt == ReceiptsRow(room, "m.read", bob.user_id, message, None, receipt.data)
    assert set(receipt.data) == {"ts"} and before <= receipt.data["ts"] <= _now_ms()

    before = _now_ms()
    await alice.set_presence("online", "interop testing")
    online = await rec.wait_for(
        "presence row",
        "presence",
        where=lambda r: r.user_id == alice.user_id and r.state == "online",
    )
    row = online[-1]
    assert isinstance(row, PresenceRow)
    assert (row.status_msg, row.currently_active) == ("interop testing", True)
    assert before <= row.last_active_ts <= _now_ms()
    seen_by_bob = await bob.presence_of(alice.user_id)
    assert seen_by_bob["presence"] == row.state
    assert seen_by_bob["status_msg"] == row.status_msg
    assert seen_by_bob["currently_active"] is row.currently_active

    await alice.send_to_device("org.example.interop", {bob.user_id: {bob.device_id: {"n": 1}}})
    (to_device,) = await rec.wait_for(
        "to_device row", "to_device", where=lambda r: r.entity == bob.user_id
    )
    assert to_device == ToDeviceRow(bob.user_id)
    await obs.assert_matches_wire()


@pytest_twisted.ensureDeferred
async def test_account_data_and_tag_rows(api: Api, obs: Observation) -> None:
    """global and room account data, and a tag: one account_data row each."""
    rec = obs.rec
    alice = await new_user(api, "alice")
    room = await alice.create_room()
    await alice.set_account_data("org.example.global", {"a": 1})
    await alice.set_room_account_data(room, "org.example.room", {"b": 2})
    await alice.add_tag(room, "u.work", 0.25)
    rows = await rec.wait_for(
        "account_data rows", "account_data", where=lambda r: r.user_id == alice.user_id, count=3
    )
    assert rows == [
        AccountDataRow(alice.user_id, None, "org.example.global"),
        AccountDataRow(alice.user_id, room, "org.example.room"),
        AccountDataRow(alice.user_id, room, "m.tag"),
    ]
    assert await alice.tags(room) == {"u.work": {"order": 0.25}}
    await obs.assert_matches_wire()


# ---------------------------------------------------------------- scenario 3

#: Streams whose history Synapse compacts: ``get_repl_stream_updates`` only
#: returns the latest row per key (the older ones are overwritten or deleted
#: in the database), so catching up over HTTP yields the current state of
#: each key, not every intermediate row.  Row -> key.
COMPACTED: dict[str, Any] = {
    "presence": lambda r: r[0],  # presence_stream keeps one row per user
    "receipts": lambda r: (r[0], r[1], r[2], r[4]),  # one per room, type, user, thread
    "account_data": lambda r: (r[0], r[1], r[2]),  # one per user, room, type
}


def _between(
    rec: Recorder, low: dict[str, dict[str, int]], high: dict[str, dict[str, int]]
) -> dict[tuple[str, str, int], list[Any]]:
    """Rows with ``low < token <= high`` for their stream and writer."""
    return {
        k: v
        for k, v in rec.keyed().items()
        if low.get(k[0], {}).get(k[1], -1) < k[2] <= high.get(k[0], {}).get(k[1], -1)
    }


def _count(keyed: dict[tuple[str, str, int], list[Any]], stream: str, *users: User) -> int:
    ids = {u.user_id for u in users}
    return sum(
        1
        for (s, _, _), rows in keyed.items()
        if s == stream
        for r in rows
        if any(isinstance(v, str) and v in ids for v in r)
    )


def _latest(
    keyed: dict[tuple[str, str, int], list[Any]], stream: str, key_of: Any
) -> dict[Any, Any]:
    latest = {}
    for (s, _, _), rows in sorted(keyed.items(), key=lambda kv: kv[0][2]):
        if s == stream:
            for row in rows:
                latest[key_of(row)] = row
    return latest


@pytest_twisted.ensureDeferred
async def test_offline_catch_up_from_a_saved_position_map(
    api: Api, obs: Observation, main_only: Deployment
) -> None:
    """A client stops; while it is away users act; restarted from its saved
    position map it receives exactly the rows it missed, over HTTP, then live
    rows again, and never a row twice.  The reference is a second client
    that stayed connected throughout (``obs``)."""
    config = load_config(*main_only.config_files["master"])
    alice, bob = await new_user(api, "alice"), await new_user(api, "bob")
    # Keep both "syncing" for Synapse, so that no presence timeout writes a
    # row for them at an unpredictable moment during the test.
    for user in (alice, bob):
        await obs.client.send_user_sync(user.user_id, user.device_id, True, _now_ms())  # type: ignore[union-attr]
    room = await alice.create_room(preset="public_chat")
    await bob.join(room)
    first = Recorder()
    client = await start_client(
        config, every(release_facts().streams, MASTER), first, adapter=obs.adapter
    )
    await alice.message(room, "before the restart")
    await first.wait_for(
        "the message before the restart",
        "events",
        EventRow,
        where=lambda r: r.room_id == room and r.type == "m.room.message",
    )
    saved = client.positions()
    await client.stop()
    await client.http.close()  # type: ignore[union-attr]

    # While the client is away: rows on many streams.
    missed_messages = [await alice.message(room, f"missed {n}") for n in range(5)]
    await alice.typing(room, True)
    # Two receipts of one user in one room, one account data type set twice,
    # and two presence changes: Synapse keeps only the latest of each.
    await bob.receipt(room, missed_messages[-2])
    await bob.receipt(room, missed_messages[-1])
    await alice.set_account_data("org.example.offline", {"n": 0})
    await alice.set_account_data("org.example.offline", {"n": 1})
    await alice.send_to_device("org.example.offline", {bob.user_id: {bob.device_id: {}}})
    await alice.set_push_rule("offline", "pie")
    await alice.set_presence("unavailable", "first")
    await alice.set_presence("online", "away from synrepl")
    reference = obs.rec
    await reference.wait_for(
        "the reference to see the last offline action",
        "presence",
        where=lambda r: r.status_msg == "away from synrepl",
    )
    missed_upto = obs.client.positions()  # type: ignore[union-attr]

    again = Recorder()
    restarted = await start_client(config, {}, again, start=saved, adapter=obs.adapter)
    try:
        await wait_until(
            lambda: all(
                restarted.positions().get(s, {}).get(w, -1) >= t
                for s, writers in missed_upto.items()
                for w, t in writers.items()
            ),
            what="the restarted client to catch up to where the reference was",
        )

        missed = _between(reference, saved, missed_upto)
        caught_up = _between(again, saved, missed_upto)
        assert {
            "events",
            "typing",
            "receipts",
            "account_data",
            "to_device",
            "push_rules",
            "presence",
        } <= {s for s, _, _ in missed}
        # Every row caught up is the row the reference got at that token...
        for key, rows in caught_up.items():
            assert missed.get(key) == rows, f"{key}: caught up {rows}, live {missed.get(key)}"
        # ...streams that keep their history give back every missed row...
        history = {k: v for k, v in missed.items() if k[0] not in COMPACTED}
        assert {k: v for k, v in caught_up.items() if k[0] not in COMPACTED} == history
        # ...and compacted ones (Synapse keeps only the latest row per key
        # there) the latest row for every key.
        for stream, key_of in COMPACTED.items():
            assert _latest(caught_up, stream, key_of) == _latest(missed, stream, key_of), stream
        # (and it does compact: the first receipt and the first account data
        # row, and alice's presence before the last change, are gone)
        for stream in ("receipts", "account_data", "presence"):
            assert _count(caught_up, stream, alice, bob) < _count(missed, stream, alice, bob), (
                stream
            )
        fetched = {(b.stream, b.writer, b.token) for b in again.batches if b.fetched}
        assert set(caught_up) <= fetched, "missed rows must come over HTTP"
        messages = {r.event_id for r in again.rows("events", EventRow)}
        assert set(missed_messages) <= messages

        # Live again: new rows arrive over Redis, once.
        live = await alice.message(room, "live after the restart")
        await again.wait_for(
            "the live message", "events", EventRow, where=lambda r: r.event_id == live
        )
        (batch,) = [
            b for b in again.batches if any(getattr(r, "event_id", None) == live for r in b.rows)
        ]
        assert not batch.fetched
        again.assert_in_order_once()
        assert all(
            token > saved.get(stream, {}).get(writer, -1) for stream, writer, token in again.keyed()
        ), "a row at or before the saved position was delivered again"
        assert again.untyped() == [] and again.gaps == []
    finally:
        await restarted.stop()
        await restarted.http.close()  # type: ignore[union-attr]
    await obs.assert_matches_wire()


# ---------------------------------------------------------------- scenario 4


@pytest_twisted.ensureDeferred
async def test_user_sync_and_clear_user_sync_drive_presence(
    api: Api, obs: Observation, main_only: Deployment
) -> None:
    """USER_SYNC start keeps a user online past the sync timeout (a control
    user without it goes offline); USER_SYNC end lets the user go offline,
    and Synapse publishes the ``last_sync_ms`` synrepl sent; CLEAR_USER_SYNC
    for synrepl's instance does the same for every user it announced.
    Observed through the client API (``GET /presence/{user}/status``, each
    user asking about themself)."""
    client = obs.client
    assert client is not None
    syncing, cleared, control = (
        await new_user(api, "syncing"),
        await new_user(api, "cleared"),
        await new_user(api, "control"),
    )
    await syncing.set_presence("online")
    await cleared.set_presence("online")
    await client.send_user_sync(syncing.user_id, syncing.device_id, True, _now_ms())
    await client.send_user_sync(cleared.user_id, cleared.device_id, True, _now_ms())
    # Set last, so the control user's timers expire no earlier than the others'.
    await control.set_presence("online")

    async def presence(user: User) -> str:
        return str((await user.presence_of(user.user_id))["presence"])

    async def wait_presence(user: User, state: str, timeout: float = 150) -> None:
        # Synapse checks presence timeouts every 5 s, starting 30 s after start-up;
        # under load one check in a few runs came after more than 60 s.
        deadline = time.monotonic() + timeout
        while (now := await presence(user)) != state:
            assert time.monotonic() < deadline, f"{user.user_id} still {now}, not {state}"
            await sleep(0.25)

    await wait_presence(control, "offline")
    assert await presence(syncing) == "online"
    assert await presence(cleared) == "online"

    # USER_SYNC end: Synapse records the last sync time synrepl sent.
    last_sync = _now_ms()
    await client.send_user_sync(syncing.user_id, syncing.device_id, False, last_sync)
    # A change that notifies nobody waits for the presence writer's next
    # persisting round (every 60 s) before its row is published: on older
    # releases (1.98.0, 1.141.0) this one often does.
    await obs.rec.wait_for(
        "the presence row for USER_SYNC end, with synrepl's last_sync_ms",
        "presence",
        where=lambda r: r.user_id == syncing.user_id and r.last_user_sync_ts == last_sync,
        timeout=75,
    )
    await wait_presence(syncing, "offline")
    assert await presence(cleared) == "online"

    # CLEAR_USER_SYNC: every user synrepl announced is let go.
    await client.send_clear_user_sync()
    await wait_presence(cleared, "offline")
    offline = await obs.rec.wait_for(
        "offline presence rows",
        "presence",
        where=lambda r: (
            r.state == "offline"
            and r.user_id in {syncing.user_id, cleared.user_id, control.user_id}
        ),
        count=3,
    )
    assert {r.user_id for r in offline} == {syncing.user_id, cleared.user_id, control.user_id}
    await obs.assert_matches_wire()


def test_config_names_master_as_the_federation_writer(main_only: Deployment) -> None:
    """With federation sending moved off the main process
    (`federation_sender_instances: []`), the main process publishes the
    federation stream (scenario 1 sees its POSITION) and synrepl's reading
    of the config says so."""
    config = load_config(*main_only.config_files["master"])
    assert config.stream_writers.writers_for_stream("federation") == ("master",)
