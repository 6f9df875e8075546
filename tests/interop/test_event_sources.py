"""synrepl.events against real Synapse: full events and positions from its
database (SQLite for the main-only deployment, PostgreSQL for the cluster)
and from its admin API.

Each test sends messages (a plain one, a state event, one that it then
redacts), reads them back through the client API, and checks that every
source gives the same sender, type, state key, content, timestamp, room
version and redaction as the client API shows.  ``positions()`` is checked
against the POSITIONs the writers announce to a fresh synrepl client.  The
sources are blocking, so the tests call them in a thread, as the client will.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_twisted
import yaml
from client_helpers import sleep
from harness import Deployment, free_port, release_facts
from matrix_api import Api, User, cluster_route, q
from repl import start_client
from twisted.internet import threads

from synrepl.config import SynapseConfig, load_config, read_config_files
from synrepl.events import (
    AdminApiEventSource,
    EventSource,
    EventSourceError,
    EventSourceUnavailable,
    FullEvent,
    PostgresEventSource,
    SqliteEventSource,
    event_source_from_config,
    thaw,
)
from synrepl.releases import ADMIN_FETCH_EVENT_SINCE

_n = itertools.count()


async def new_user(api: Api, name: str) -> User:
    return await api.register(f"{name}{next(_n)}x{time.time_ns() % 10**10}")


async def register_admin(api: Api, deployment: Deployment) -> User:
    """A server admin, made through Synapse's shared-secret registration."""
    secret = yaml.safe_load(deployment.shared_config.read_text())["registration_shared_secret"]
    path = "/_synapse/admin/v1/register"
    nonce = (await api.request("GET", path))["nonce"]
    localpart, password = f"admin{next(_n)}x{time.time_ns() % 10**10}", "interop-admin"
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), b"admin"]))
    body = {
        "nonce": nonce,
        "username": localpart,
        "password": password,
        "admin": True,
        "mac": mac.hexdigest(),
    }
    answer = await api.request("POST", path, body)
    return User(api, answer["user_id"], answer["device_id"], answer["access_token"], password)


async def fill_room(user: User, room: str) -> dict[str, str]:
    """A message, a state event, a message that is then redacted."""
    sent = {
        "message": await user.message(room, f"hello {room}"),
        "state": await user.set_state(room, "m.room.topic", {"topic": f"topic of {room}"}),
        "secret": await user.message(room, "soon redacted"),
    }
    sent["redaction"] = await user.redact(room, sent["secret"])
    return sent


async def client_view(user: User, room: str) -> tuple[dict[str, dict[str, Any]], str]:
    """Every event of the room as the client API shows it, and the room version."""
    events = {e["event_id"]: e for e in await user.messages(room)}
    create = await user.call(
        "GET", f"/_matrix/client/v3/rooms/{q(room)}/state/m.room.create/", params={}
    )
    return events, str(create.get("room_version", "1"))


def assert_same_as_client(
    got: FullEvent, shown: dict[str, Any], room_version: str, *, redactions_known: bool = True
) -> None:
    """A source's event says what the client API says."""
    assert got.event_id == shown["event_id"]
    assert got.room_id == shown["room_id"]
    assert got.sender == shown["sender"]
    assert got.type == shown["type"]
    assert got.state_key == shown.get("state_key")
    assert got.origin_server_ts == shown["origin_server_ts"]
    assert got.redacts == (shown.get("redacts") or shown["content"].get("redacts"))
    assert not got.rejected and not got.outlier
    assert got.room_version == room_version
    redacted = "redacted_because" in shown.get("unsigned", {})
    if redactions_known:
        assert got.redacted is redacted
        assert thaw(got.content) == shown["content"]
        if redacted:
            assert got.redacted_by == shown["unsigned"]["redacted_because"]["event_id"]
    else:
        # The admin API shows the event as stored: content not yet censored.
        assert got.redacted is False
        if not redacted:
            assert thaw(got.content) == shown["content"]


async def call(source: EventSource, method: str, *args: Any) -> Any:
    return await threads.deferToThread(getattr(source, method), *args)


async def assert_source_matches_client(
    source: EventSource, user: User, rooms: list[str], *, redactions_known: bool = True
) -> None:
    for room in rooms:
        shown, version = await client_view(user, room)
        ids = [*shown, "$unknown-event-id", f"$nope{next(_n)}"]
        got = await call(source, "fetch", ids)
        assert set(got) == set(shown), "unknown events are absent, known ones present"
        for event_id, event in shown.items():
            assert_same_as_client(got[event_id], event, version, redactions_known=redactions_known)
        bodies = {e.content.get("body") for e in got.values()}
        assert f"hello {room}" in bodies
        if redactions_known:
            assert "soon redacted" not in bodies
        else:
            assert "soon redacted" in bodies


async def announced_event_positions(config: SynapseConfig, writers: set[str]) -> dict[str, int]:
    """The events positions the writers announce (POSITION) to a fresh client."""
    client = await start_client(config, {"events": writers})
    try:
        return dict(client.positions()["events"])
    finally:
        await client.stop()
        if client.http is not None:
            await client.http.close()


async def assert_positions_announced(
    source: EventSource, config: SynapseConfig, writers: set[str]
) -> None:
    """The source's positions are the writers' own, once they are quiet."""
    seen: list[Any] = []
    deadline = time.monotonic() + 20
    while True:
        ours = (await call(source, "positions"))["events"]
        announced = await announced_event_positions(config, writers)
        seen.append((ours, announced))
        if ours == announced:
            print(f"positions agree after {len(seen)} reads: {ours}")
            return
        assert time.monotonic() < deadline, f"source != announced, history: {seen[-5:]}"
        await sleep(0.3)


# ---------------------------------------------------------------- SQLite (main only)


def sqlite_path(deployment: Deployment) -> str:
    raw = read_config_files(deployment.shared_config)
    return str(raw["database"]["args"]["database"])


@pytest.mark.main_only
@pytest_twisted.ensureDeferred
async def test_sqlite_source_matches_client_api(main_only: Deployment, api: Api) -> None:
    """SqliteEventSource, read-only on the running main process's file, gives
    every event of the room as the client API shows it (the redacted message
    with its content pruned), and leaves unknown events out."""
    alice = await new_user(api, "alice")
    room = await alice.create_room(preset="public_chat")
    await fill_room(alice, room)
    source = event_source_from_config(read_config_files(main_only.shared_config))
    assert isinstance(source, SqliteEventSource)
    try:
        await assert_source_matches_client(source, alice, [room])
        # The homeserver keeps writing while we hold the file open.
        await alice.message(room, "after the reads")
    finally:
        source.close()


@pytest.mark.main_only
@pytest_twisted.ensureDeferred
async def test_sqlite_positions_are_the_announced_ones(main_only: Deployment, api: Api) -> None:
    """positions() read from SQLite equals the events POSITION of the main
    process, the single writer, after it has written."""
    alice = await new_user(api, "alice")
    room = await alice.create_room()
    await alice.message(room, "move the stream")
    with SqliteEventSource(sqlite_path(main_only)) as source:
        await assert_positions_announced(
            source, load_config(*main_only.config_files["master"]), {"master"}
        )


def admin_fetch_missing() -> bool:
    """The release under test has no admin API to fetch an event."""
    return release_facts().release < ADMIN_FETCH_EVENT_SINCE


async def assert_refused_for_its_release(source: EventSource, event_id: str) -> None:
    """An older release: one clear, final error naming it (not "unavailable",
    which would be retried for ever)."""
    with pytest.raises(EventSourceError) as caught:
        await call(source, "fetch", [event_id])
    assert not isinstance(caught.value, EventSourceUnavailable)
    release = release_facts().release
    assert f"Synapse {release} has no admin API to fetch an event" in str(caught.value)


@pytest.mark.main_only
@pytest_twisted.ensureDeferred
async def test_admin_api_source_on_main_only(main_only: Deployment, api: Api) -> None:
    """AdminApiEventSource with an admin's token gives the same senders,
    types, bodies and room versions; an unknown event is absent; it cannot
    tell redactions and has no positions."""
    alice = await new_user(api, "alice")
    room = await alice.create_room(preset="public_chat")
    await fill_room(alice, room)
    admin = await register_admin(api, main_only)
    source = event_source_from_config(
        {}, admin_url=main_only.client_urls["master"], admin_token=admin.access_token
    )
    assert isinstance(source, AdminApiEventSource)
    try:
        if admin_fetch_missing():
            sent = await alice.message(room, "one more")
            await assert_refused_for_its_release(source, sent)
            return
        await assert_source_matches_client(source, alice, [room], redactions_known=False)
        assert await call(source, "positions") == {}
    finally:
        source.close()


@pytest.mark.main_only
@pytest_twisted.ensureDeferred
async def test_admin_api_refuses_a_non_admin(main_only: Deployment, api: Api) -> None:
    """A token that is not an admin's is a refusal (unavailable: retried),
    and the token is not in the message."""
    alice = await new_user(api, "alice")
    room = await alice.create_room()
    event_id = await alice.message(room, "hi")
    source = AdminApiEventSource(main_only.client_urls["master"], alice.access_token)
    if admin_fetch_missing():
        await assert_refused_for_its_release(source, event_id)
        source.close()
        return
    with pytest.raises(EventSourceUnavailable) as caught:
        await call(source, "fetch", [event_id])
    assert alice.access_token not in str(caught.value)
    assert "403" in str(caught.value)
    source.close()


# ---------------------------------------------------------------- PostgreSQL (cluster)

PERSISTERS = ("persister1", "persister2")


@pytest_twisted.async_yield_fixture
async def cluster_api(cluster: Deployment) -> AsyncIterator[Api]:
    client = Api(cluster_route(cluster.client_urls))
    yield client
    await client.close()


async def rooms_on_each_persister(user: User, config: SynapseConfig) -> dict[str, str]:
    rooms: dict[str, str] = {}
    for _ in range(40):
        if len(rooms) == len(PERSISTERS):
            return rooms
        room = await user.create_room(preset="public_chat")
        rooms.setdefault(config.stream_writers.event_persister_for_room(room), room)
    raise AssertionError(f"no room on every persister: {rooms}")


def superuser_conninfo(cluster: Deployment) -> str:
    db = cluster.database
    assert db is not None
    return psycopg.conninfo.make_conninfo(
        host=db.host, port=db.port, user=db.user, dbname=db.name, password=db.password
    )


#: What a read-only role for PostgresEventSource needs: SELECT on these.
READ_TABLES = (
    "events",
    "event_json",
    "rooms",
    "rejections",
    "redactions",
    "room_ban_redactions",
    "stream_positions",
    "current_state_delta_stream",
    "ex_outlier_stream",
)


@pytest.fixture
def read_only_role(cluster: Deployment) -> Any:
    """A login role with SELECT on the tables the source reads, nothing more."""
    role, password = f"observer_{secrets.token_hex(4)}", secrets.token_hex(12)
    with psycopg.connect(superuser_conninfo(cluster), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        present = {
            name
            for (name,) in conn.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()"
            )
        }
        # An older release lacks the newer tables (room_ban_redactions).
        granted = [t for t in READ_TABLES if t in present]
        conn.execute(f"GRANT SELECT ON {', '.join(granted)} TO {role}")
    db = cluster.database
    assert db is not None
    yield psycopg.conninfo.make_conninfo(
        host=db.host, port=db.port, user=role, password=password, dbname=db.name
    )
    with psycopg.connect(superuser_conninfo(cluster), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role]
        )
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


@pytest.mark.cluster
@pytest_twisted.ensureDeferred
async def test_postgres_source_matches_client_api(
    cluster: Deployment, cluster_api: Api, read_only_role: str
) -> None:
    """PostgresEventSource, as a role that may only SELECT, gives every event
    of a room on each event persister as the client API shows it."""
    config = load_config(cluster.shared_config)
    alice = await new_user(cluster_api, "alice")
    rooms = await rooms_on_each_persister(alice, config)
    for room in rooms.values():
        await fill_room(alice, room)
    with PostgresEventSource(read_only_role, writers=PERSISTERS) as source:
        await assert_source_matches_client(source, alice, list(rooms.values()))
        assert source.positions()["events"].keys() == set(PERSISTERS)


@pytest.mark.cluster
def test_postgres_transactions_are_read_only_even_for_a_superuser(cluster: Deployment) -> None:
    """Whatever the role may do, the source's transactions cannot write."""
    with PostgresEventSource(superuser_conninfo(cluster)) as source:
        with pytest.raises(EventSourceError, match="read-only transaction"):
            source._read(lambda run: run("CREATE TABLE synrepl_must_not_exist (x int)", []))
        assert source.fetch(["$unknown"]) == {}, "and the connection is still usable"


@pytest.mark.cluster
@pytest_twisted.ensureDeferred
async def test_postgres_source_from_homeserver_yaml(cluster: Deployment, cluster_api: Api) -> None:
    """event_source_from_config reads the cluster's database section and
    stream writers, and the source it makes fetches a batch in one go."""
    source = event_source_from_config(read_config_files(cluster.shared_config))
    assert isinstance(source, PostgresEventSource)
    assert source.writers == PERSISTERS
    alice = await new_user(cluster_api, "alice")
    room = await alice.create_room()
    sent = [await alice.message(room, f"m{n}") for n in range(5)]
    try:
        got = await call(source, "fetch", sent)
        assert [got[e].content["body"] for e in sent] == [f"m{n}" for n in range(5)]
    finally:
        source.close()


@pytest.mark.cluster
@pytest_twisted.ensureDeferred
async def test_postgres_positions_are_the_announced_ones(
    cluster: Deployment, cluster_api: Api
) -> None:
    """positions() equals, per persister, the events POSITION each announces
    after both have written (an idle persister announces the newest ID too,
    which Synapse's own reading of stream_positions also arrives at)."""
    config = load_config(cluster.shared_config)
    alice = await new_user(cluster_api, "alice")
    rooms = await rooms_on_each_persister(alice, config)
    for room in rooms.values():
        await alice.message(room, "move the stream")
    # Then only persister1 writes: persister2's own record falls behind.
    for n in range(3):
        await alice.message(rooms["persister1"], f"only persister1 {n}")
    with PostgresEventSource(superuser_conninfo(cluster), writers=PERSISTERS) as source:
        await assert_positions_announced(source, config, set(PERSISTERS))
    assert cluster.database is not None
    recorded = dict(
        cluster.database.query(
            "SELECT instance_name, stream_id FROM stream_positions WHERE stream_name = 'events'"
        )
    )
    announced = await announced_event_positions(config, set(PERSISTERS))
    # The idle persister announces the newest ID, above what it recorded:
    # reading stream_positions alone would be behind.
    assert recorded["persister2"] < announced["persister2"] == announced["persister1"]


@pytest.mark.cluster
@pytest_twisted.ensureDeferred
async def test_admin_api_source_on_the_cluster(cluster: Deployment, cluster_api: Api) -> None:
    """The admin API of the cluster's main process gives events persisted by
    either persister."""
    config = load_config(cluster.shared_config)
    alice = await new_user(cluster_api, "alice")
    rooms = await rooms_on_each_persister(alice, config)
    for room in rooms.values():
        await fill_room(alice, room)
    admin = await register_admin(cluster_api, cluster)
    with AdminApiEventSource(cluster.client_urls["master"], admin.access_token) as source:
        if admin_fetch_missing():
            await assert_refused_for_its_release(
                source, await alice.message(rooms["persister1"], "x")
            )
            return
        await assert_source_matches_client(
            source, alice, list(rooms.values()), redactions_known=False
        )


# ---------------------------------------------------------------- sources that are down


def test_postgres_down_is_unavailable_within_the_timeout() -> None:
    """A database on a closed port: EventSourceUnavailable, quickly, with
    neither the password nor a traceback chain in the message."""
    port = free_port()
    source = PostgresEventSource(
        f"host=127.0.0.1 port={port} dbname=synapse user=observer password=hunter2secret",
        connect_timeout=2,
    )
    started = time.monotonic()
    for method, args in (("fetch", (["$a"],)), ("positions", ())):
        with pytest.raises(EventSourceUnavailable) as caught:
            getattr(source, method)(*args)
        assert "hunter2secret" not in str(caught.value)
        assert caught.value.__cause__ is None
    assert time.monotonic() - started < 2 * 3
    source.close()


def test_postgres_unroutable_host_is_bounded_by_connect_timeout() -> None:
    """A host that never answers (a blackholed address) fails within
    connect_timeout, not the system's TCP timeout."""
    source = PostgresEventSource("host=10.255.255.1 port=5432 dbname=x user=y", connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(EventSourceUnavailable):
        source.fetch(["$a"])
    assert time.monotonic() - started < 5
    source.close()


def test_admin_api_down_is_unavailable() -> None:
    source = AdminApiEventSource(f"http://127.0.0.1:{free_port()}", "syt_secret_token", timeout=2)
    with pytest.raises(EventSourceUnavailable) as caught:
        source.fetch(["$a"])
    assert "syt_secret_token" not in str(caught.value)
    source.close()
