"""`synrepl watch` against real Synapse: full events, and --resume alone.

- ``watch --full --sender USER`` (read-only) prints that user's events with
  sender and body, read from Synapse's SQLite database as homeserver.yaml
  names it, and from the admin API with an admin's token (which it never
  prints); another user's events are not shown.
- ``watch --resume FILE`` alone on the channel (no other synrepl process, no
  REPLICATE: watch opens no publishing connection at all) is stopped,
  messages are sent while it is down, and the next run prints exactly those
  missed messages (then the one that wakes each writer up), once each: on the
  single-process SQLite deployment with plain rows, and on the two-persister
  PostgreSQL cluster with --full.

Each run is ``python -m synrepl watch ...`` as a subprocess, its output in files.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import redis
import yaml
from client_helpers import sleep, wait_until
from harness import Deployment, release_facts, subscribers
from matrix_api import Api, User, cluster_route, main_only_route

from synrepl.config import SynapseConfig, load_config
from synrepl.releases import ADMIN_FETCH_EVENT_SINCE

_n = itertools.count()

#: Generous bounds: each step takes well under a second on a quiet machine.
TIMEOUT = 45.0


class Watch:
    """One ``synrepl watch`` subprocess, its stdout and stderr in files."""

    def __init__(self, deployment: Deployment, directory: Path, *args: str) -> None:
        label = f"watch{next(_n)}"
        self.out = directory / f"{label}.stdout"
        self.err = directory / f"{label}.stderr"
        configs = [a for path in deployment.config_files["master"] for a in ("-c", str(path))]
        self.argv = [sys.executable, "-m", "synrepl", "watch", *configs, "--color", "never", *args]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The complete JSON lines printed so far."""
        text = self.stdout()
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    async def wait_for_stderr(self, text: str, timeout: float = TIMEOUT) -> None:
        def seen() -> bool:
            return text in self.stderr() or self.proc.poll() is not None

        await wait_until(seen, timeout=timeout, what=text)
        assert text in self.stderr(), f"exited {self.proc.poll()}: {self.stderr()[-3000:]}"

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGINT (Ctrl-C), then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        await wait_until(lambda: self.proc.poll() is not None, timeout=timeout, what="exit")
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    made: list[Watch] = []
    yield made
    for watch in made:
        watch.kill()


async def start_watch(
    deployment: Deployment, directory: Path, watches: list[Watch], *args: str
) -> Watch:
    """Start watch and wait until it is subscribed, read-only (its one Redis
    connection is the subscriber: no publishing connection, so no REPLICATE)."""
    before = subscribers(deployment.redis_port, deployment.server_name)
    watch = Watch(deployment, directory, *args)
    watches.append(watch)
    await watch.wait_for_stderr("synrepl watch:")
    await wait_until(
        lambda: subscribers(deployment.redis_port, deployment.server_name) > before,
        timeout=TIMEOUT,
        what="watch subscribed",
    )
    assert_read_only(deployment)
    return watch


def assert_read_only(deployment: Deployment) -> None:
    client = redis.Redis(host="127.0.0.1", port=deployment.redis_port, socket_timeout=5)
    try:
        names = [str(c.get("name", "")) for c in client.client_list()]
    finally:
        client.close()
    assert "synrepl-watch-sub" in names, names
    assert "synrepl-watch-pub" not in names, names


async def new_user(api: Api, name: str) -> User:
    return await api.register(f"{name}{next(_n)}x{time.time_ns() % 10**10}")


async def register_admin(api: Api, deployment: Deployment) -> User:
    """A server admin, made through Synapse's shared-secret registration."""
    secret = yaml.safe_load(deployment.shared_config.read_text())["registration_shared_secret"]
    path = "/_synapse/admin/v1/register"
    nonce = (await api.request("GET", path))["nonce"]
    localpart, password = f"watchadmin{next(_n)}x{time.time_ns() % 10**10}", "interop-admin"
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


def events_of(watch: Watch) -> list[tuple[str, str, str, Any]]:
    """(room, sender, type, body) of each EVENT record."""
    return [
        (e["room_id"], e["sender"], e["type"], e["content"].get("body"))
        for r in watch.records()
        if r["command"] == "EVENT" and (e := r["event"]) is not None
    ]


async def shared_room(alice: User, bob: User) -> str:
    room = await alice.create_room(preset="public_chat")
    await bob.join(room)
    return room


# ---------------------------------------------------------------- --full --sender


@pytest.mark.main_only
@pytest_twisted.ensureDeferred
async def test_full_sender_prints_sender_and_body_from_the_database(
    main_only: Deployment, api: Api, tmp_path: Path, watches: list[Watch]
) -> None:
    """`watch --full --sender ALICE` (content from the SQLite database that
    homeserver.yaml names) prints Alice's message as `ROOM ALICE: BODY`, in
    JSON with every field, and her topic change; Bob's message not at all."""
    alice, bob = await new_user(api, "alice"), await new_user(api, "bob")
    room = await shared_room(alice, bob)
    as_json = await start_watch(
        main_only, tmp_path, watches, "--full", "--sender", alice.user_id, "--json"
    )
    as_text = await start_watch(main_only, tmp_path, watches, "--sender", alice.user_id)
    sent = await alice.message(room, "hello from alice")
    await bob.message(room, "hello from bob")
    await alice.set_state(room, "m.room.topic", {"topic": "alice's topic"})
    for watch in (as_json, as_text):
        await wait_until(
            lambda watch=watch: "alice's topic" in watch.stdout(), timeout=TIMEOUT, what="topic"
        )
    await sleep(0.5)
    for watch in (as_json, as_text):
        assert await watch.stop() == 0, watch.stderr()
    assert events_of(as_json) == [
        (room, alice.user_id, "m.room.message", "hello from alice"),
        (room, alice.user_id, "m.room.topic", None),
    ]
    first = as_json.records()[0]
    assert first["stream"] == "events" and first["writer"] == "master"
    event = first["event"]
    assert event["event_id"] == sent and event["content"] == {
        "msgtype": "m.text",
        "body": "hello from alice",
    }
    assert set(event) == {
        "event_id", "room_id", "type", "sender", "state_key", "content", "origin_server_ts",
        "unsigned", "redacts", "room_version", "rejected", "rejection_reason", "outlier",
        "redacted", "redacted_by",
    }  # fmt: skip
    assert isinstance(event["room_version"], str) and event["origin_server_ts"] > 0
    lines = as_text.stdout().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith(f"{room} {alice.user_id}: hello from alice") or lines[0].endswith(
        f"{room} {alice.user_id}: hello from alice (fetched)"
    )
    assert f'{room} {alice.user_id} m.room.topic state_key="" topic="alice\'s topic"' in lines[1]
    assert "hello from bob" not in as_json.stdout() + as_text.stdout()
    assert "events read from SQLite" in as_json.stderr()


@pytest.mark.main_only
@pytest_twisted.ensureDeferred
async def test_full_sender_reads_the_admin_api(
    main_only: Deployment, api: Api, tmp_path: Path, watches: list[Watch]
) -> None:
    """The same through the admin API (--admin-url, --admin-token-file with
    a server admin's token): sender and body, and the token never shown."""
    alice, bob = await new_user(api, "alice"), await new_user(api, "bob")
    room = await shared_room(alice, bob)
    admin = await register_admin(api, main_only)
    token_file = tmp_path / "admin.token"
    token_file.write_text(admin.access_token + "\n")
    url = main_only.client_urls["master"]
    options = ("--admin-url", url, "--admin-token-file", str(token_file))
    release = release_facts().release
    if release < ADMIN_FETCH_EVENT_SINCE:
        # An older release: watch refuses at start, saying why.
        refused = Watch(main_only, tmp_path, "--sender", alice.user_id, "--json", *options)
        watches.append(refused)
        await wait_until(lambda: refused.proc.poll() is not None, timeout=TIMEOUT, what="exit")
        assert refused.proc.returncode == 1
        assert f"Synapse {release} has no admin API to fetch an event" in refused.stderr()
        return
    watch = await start_watch(
        main_only, tmp_path, watches, "--sender", alice.user_id, "--json", *options
    )
    await bob.message(room, "bob over the admin API")
    await alice.message(room, "alice over the admin API")
    await wait_until(lambda: "alice over" in watch.stdout(), timeout=TIMEOUT, what="message")
    await sleep(0.5)
    assert await watch.stop() == 0, watch.stderr()
    assert events_of(watch) == [(room, alice.user_id, "m.room.message", "alice over the admin API")]
    assert f"events read from the admin API at {url}" in watch.stderr()
    assert admin.access_token not in watch.stdout() + watch.stderr()


# ---------------------------------------------------------------- --resume alone


async def rooms_on_each_writer(
    user: User, config: SynapseConfig, writers: Sequence[str]
) -> dict[str, str]:
    """One room per events writer (synrepl's room -> persister choice)."""
    rooms: dict[str, str] = {}
    for _ in range(40):
        if len(rooms) == len(writers):
            return rooms
        room = await user.create_room(preset="public_chat")
        rooms.setdefault(config.stream_writers.event_persister_for_room(room), room)
    raise AssertionError(f"no room on every writer: {rooms}")


RESUME = [
    pytest.param("main_only", marks=pytest.mark.main_only, id="sqlite-rows"),
    pytest.param("cluster", marks=pytest.mark.cluster, id="cluster-full"),
]


@pytest.fixture(params=RESUME)
def deployment(request: pytest.FixtureRequest) -> Deployment:
    """main_only (watched as plain rows) or cluster (watched with --full)."""
    found: Deployment = request.getfixturevalue(request.param)
    return found


@pytest_twisted.ensureDeferred
async def test_resume_alone_across_a_restart_prints_exactly_the_missed_messages(
    deployment: Deployment, tmp_path: Path, watches: list[Watch]
) -> None:
    """`watch --resume FILE` alone and read-only: the first run, from now,
    says when every events writer has a position (FILE then holds them all);
    stopped, with messages sent while it is down, the next run prints exactly
    those messages once each when each writer writes again (each writer's
    next message wakes it up, and is printed after them), nothing twice.
    On the cluster (two persisters), with --full from PostgreSQL."""
    full = deployment.database is not None
    route = cluster_route if full else main_only_route
    api = Api(route(deployment.client_urls))
    try:
        await _resume_alone(deployment, api, full, tmp_path, watches)
    finally:
        await api.close()


async def _resume_alone(
    deployment: Deployment, api: Api, full: bool, tmp_path: Path, watches: list[Watch]
) -> None:
    config = load_config(*deployment.config_files["master"])
    writers = config.stream_writers.writers_for_stream("events")
    alice = await new_user(api, "alice")
    rooms = await rooms_on_each_writer(alice, config, writers)
    position_file = tmp_path / "watch.pos"
    args = ["--json", "--type", "m.room.message", "--resume", str(position_file)]
    for room in rooms.values():
        args += ["--room", room]
    if full:
        args.append("--full")

    def printed(watch: Watch) -> list[tuple[str, str, bool]]:
        """(writer, event ID, fetched) of each message printed."""
        out = []
        for r in watch.records():
            event_id = r["event"]["event_id"] if r["command"] == "EVENT" else r["row"]["event_id"]
            out.append((r["writer"], event_id, r["fetched"]))
        return out

    async def say(tag: str) -> list[tuple[str, str]]:
        return [
            (writer, await alice.message(room, f"{tag} on {writer}"))
            for writer, room in rooms.items()
        ]

    first = await start_watch(deployment, tmp_path, watches, *args)
    assert "from now, positions kept in" in first.stderr()
    before = await say("before")
    await wait_until(lambda: len(printed(first)) == len(before), timeout=TIMEOUT, what="before")
    await first.wait_for_stderr("synrepl watch: ready: every writer has a position")
    saved = json.loads(position_file.read_text())["positions"]["events"]
    assert set(saved) == set(writers)
    await sleep(0.5)
    assert await first.stop() == 0, first.stderr()
    assert [(w, e) for w, e, _ in printed(first)] == before

    missed = [m for _ in range(3) for m in await say("missed")]
    second = await start_watch(deployment, tmp_path, watches, *args)
    await second.wait_for_stderr("synrepl watch: ready: every writer has a position")
    assert f"resuming from '{position_file}'" in second.stderr()
    wake = await say("after")
    await wait_until(
        lambda: len(printed(second)) >= len(missed) + len(wake), timeout=TIMEOUT, what="missed"
    )
    await sleep(1.0)
    assert await second.stop() == 0, second.stderr()
    got = printed(second)
    for writer in writers:
        mine = [(e, fetched) for w, e, fetched in got if w == writer]
        expected = [e for w, e in [*missed, *wake] if w == writer]
        assert [e for e, _ in mine] == expected, writer
        assert all(fetched for e, fetched in mine if e != expected[-1]), mine
    if full:
        bodies = [body for _, _, _, body in events_of(second)]
        assert sorted(bodies) == sorted(
            [f"missed on {w}" for w, _ in missed] + [f"after on {w}" for w in writers]
        )
    for watch in (first, second):
        assert "Traceback" not in watch.stderr() and "rows lost" not in watch.stderr()
