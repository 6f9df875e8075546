"""Observers that get every message, alone and read-only (issue 10), against real Synapse.

Every scenario runs the observer *alone* on the deployment's Redis: no other
synrepl client, nobody sending REPLICATE.  :class:`RedisWatch` checks that
with Redis ``MONITOR`` and ``CLIENT LIST``: the observer's connections (the
ones that appeared after the watch began) sent nothing but ``SUBSCRIBE`` and
keepalive ``PING``s, no publishing connection was ever opened, and no
``PUBLISH`` during the scenario carried a REPLICATE.

1. ``examples/bridge_observer.py`` as a subprocess: every message sent after
   ``ready`` is printed exactly once as ``ROOM_ID SENDER: BODY``, and nothing
   else (rooms on both event persisters on the cluster).
2. SIGKILL mid-traffic, restart from the checkpoint while messages keep
   coming: nothing missing, duplicates at most the last unacknowledged batch.
3. SIGTERM (exit 0), messages while it is down, restart: exactly once.
4. An in-process client whose handler fails on one message: retried, then
   dead-lettered (a real file / SQLite store) while later messages arrive;
   with ``then="stop"`` and no store, ``finished()`` fails with
   DeliveryStoppedError and the checkpoint stays before the failed batch.
5. EventFilter by room, type wildcard, sender, membership: only matching
   events reach each handler, and rows refused on the row are never fetched.
6. The admin-API source: the example with ``--admin-url`` prints the same lines.
7. (cluster) Synapse's PostgreSQL unreachable for a few seconds through a TCP
   proxy the test runs: messages sent meanwhile arrive once it is back, none
   lost or repeated, and the position never moved past them meanwhile; the
   example stopped with SIGTERM meanwhile exits 0 and its next run prints
   them once.

Three problems these tests found are pinned too: a restart from a
checkpoint fetches what was written while it was down without waiting for
new traffic (``test_restart_catches_up_without_new_traffic``); ``stop()``
is prompt when the batch out with ``on_events`` is abandoned
(``test_stop_is_prompt_while_the_database_is_down``); and a database call
that hangs does not keep the example from exiting on SIGTERM
(``test_example_exits_on_sigterm_while_a_database_call_hangs``).

Each parametrized scenario runs on the single-process SQLite deployment
(``main_only``) and on the multi-writer PostgreSQL cluster (``cluster``).
Measurements (duplicates seen, retries, down times) are printed: run with
``-s`` to see them.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import attrs
import pytest
import pytest_twisted
import yaml
from client_helpers import sleep, wait_until
from harness import Deployment, release_facts
from matrix_api import Api, User, cluster_route, main_only_route, q
from redis_server import RedisServer
from repl import MonitorTap
from twisted.internet import defer, reactor
from twisted.python.failure import Failure

from synrepl.checkpoints import FileCheckpointStore
from synrepl.config import SynapseConfig, load_config, read_config_files
from synrepl.connection import ReconnectBackoff
from synrepl.deadletters import FileDeadLetterStore, SqliteDeadLetterStore
from synrepl.delivery import HandlerFailurePolicy
from synrepl.events import (
    EventFetchPolicy,
    EventFilter,
    EventSource,
    EventsReceived,
    FullEvent,
    PostgresEventSource,
    event_source_from_config,
)
from synrepl.releases import ADMIN_FETCH_EVENT_SINCE
from synrepl.streams import EventRow, parse_row
from synrepl.twisted.client import DeliveryStoppedError, ReplicationClient

PERSISTERS = ("persister1", "persister2")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bridge_observer.py"

#: Generous bounds: nothing here should take more than a few seconds.
READY_TIMEOUT = 60.0
ARRIVAL_TIMEOUT = 45.0

_n = itertools.count()


def report(text: str) -> None:
    """A measurement, shown with ``pytest -s``."""
    print(f"[observers] {text}", flush=True)


# ---------------------------------------------------------------- deployments


@attrs.define
class Target:
    """One deployment as the observer sees it."""

    kind: str
    deployment: Deployment
    redis: RedisServer
    api: Api

    @property
    def files(self) -> list[Path]:
        return self.deployment.config_files["master"]

    @property
    def config(self) -> SynapseConfig:
        return load_config(*self.files)

    @property
    def writers(self) -> tuple[str, ...]:
        return ("master",) if self.kind == "main_only" else PERSISTERS

    @property
    def server_name(self) -> str:
        return self.deployment.server_name

    def source(self) -> EventSource:
        """The event source the example would make (Synapse's own database)."""
        return event_source_from_config(read_config_files(*self.files), timeout=5)

    def event_positions(self, event_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """Where Synapse persisted each event: (writer, stream token), from its database."""
        if self.deployment.database is not None:
            rows = self.deployment.database.query(
                "SELECT event_id, instance_name, stream_ordering FROM events "
                "WHERE event_id = ANY(%s)",
                (list(event_ids),),
            )
        else:
            raw = read_config_files(self.deployment.shared_config)
            path = Path(raw["database"]["args"]["database"]).absolute()
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                marks = ",".join("?" * len(event_ids))
                rows = db.execute(
                    "SELECT event_id, instance_name, stream_ordering FROM events "
                    f"WHERE event_id IN ({marks})",
                    list(event_ids),
                ).fetchall()
            finally:
                db.close()
        return {e: (w or "master", int(t)) for e, w, t in rows}


DEPLOYMENTS = [
    pytest.param("main_only", marks=pytest.mark.main_only),
    pytest.param("cluster", marks=pytest.mark.cluster),
]


@pytest.fixture(params=DEPLOYMENTS)
def deployment_kind(request: pytest.FixtureRequest) -> tuple[str, Deployment, RedisServer]:
    kind = request.param
    deployment = request.getfixturevalue(kind)
    redis = request.getfixturevalue("main_redis" if kind == "main_only" else "cluster_redis")
    return kind, deployment, redis


@pytest_twisted.async_yield_fixture
async def target(deployment_kind: tuple[str, Deployment, RedisServer]) -> AsyncIterator[Target]:
    kind, deployment, redis = deployment_kind
    route = (main_only_route if kind == "main_only" else cluster_route)(deployment.client_urls)
    api = Api(route)
    yield Target(kind, deployment, redis, api)
    await api.close()


@pytest_twisted.async_yield_fixture
async def cluster_target(cluster: Deployment, cluster_redis: RedisServer) -> AsyncIterator[Target]:
    api = Api(cluster_route(cluster.client_urls))
    yield Target("cluster", cluster, cluster_redis, api)
    await api.close()


async def new_user(api: Api, name: str) -> User:
    return await api.register(f"{name}{next(_n)}x{time.time_ns() % 10**10}")


async def register_admin(t: Target) -> User:
    """A server admin, made through Synapse's shared-secret registration."""
    shared = yaml.safe_load(t.deployment.shared_config.read_text())
    path = "/_synapse/admin/v1/register"
    nonce = (await t.api.request("GET", path))["nonce"]
    localpart, password = f"obsadmin{next(_n)}x{time.time_ns() % 10**10}", "interop-admin"
    mac = hmac.new(shared["registration_shared_secret"].encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), b"admin"]))
    body = {
        "nonce": nonce,
        "username": localpart,
        "password": password,
        "admin": True,
        "mac": mac.hexdigest(),
    }
    answer = await t.api.request("POST", path, body)
    return User(t.api, answer["user_id"], answer["device_id"], answer["access_token"], password)


async def rooms_per_writer(
    t: Target, owner: User, per_writer: int, joiners: Sequence[User] = ()
) -> dict[str, list[str]]:
    """``per_writer`` public rooms on each events writer, joined by ``joiners``.

    synrepl's room -> persister choice is checked against where Synapse
    really persisted each room (its ``events`` table).
    """
    config = t.config
    rooms: dict[str, list[str]] = {w: [] for w in t.writers}
    for _ in range(60):
        if all(len(r) >= per_writer for r in rooms.values()):
            break
        room = await owner.create_room(preset="public_chat")
        writer = config.stream_writers.event_persister_for_room(room)
        if len(rooms[writer]) >= per_writer:
            continue
        rooms[writer].append(room)
        for user in joiners:
            await user.join(room)
    assert all(len(r) >= per_writer for r in rooms.values()), rooms
    if t.deployment.database is not None:
        everything = [r for rs in rooms.values() for r in rs]
        actual = dict(
            t.deployment.database.query(
                "SELECT DISTINCT room_id, instance_name FROM events WHERE room_id = ANY(%s)",
                (everything,),
            )
        )
        assert actual == {r: w for w, rs in rooms.items() for r in rs}
    return rooms


def line(room: str, user: User, body: str) -> str:
    """What the example prints for a message."""
    return f"{room} {user.user_id}: {body}"


async def with_timeout(d: Any, seconds: float, what: str) -> Any:
    """Await a Deferred (or coroutine), failing after ``seconds``."""
    deferred = defer.ensureDeferred(d) if not isinstance(d, defer.Deferred) else d
    deferred.addTimeout(seconds, reactor)
    try:
        return await deferred
    except defer.TimeoutError:
        raise AssertionError(f"timed out after {seconds}s: {what}") from None


# ---------------------------------------------------------------- Redis: alone and silent

_ADDRESS = re.compile(r"^\S+ \[\d+ ([^\]]+)\] ")


class RedisWatch:
    """MONITOR and CLIENT LIST on the deployment's Redis while an observer runs.

    Every connection present when the watch starts belongs to Synapse (or to
    the watch itself); the connections that appear later are the observer's.
    """

    def __init__(self, t: Target) -> None:
        self.server_name = t.server_name
        self.monitor = MonitorTap(t.redis.port).start()
        self._redis = t.redis.client()
        self.me = str(self._redis.client_info()["addr"])
        self.before = {str(c["addr"]) for c in self._redis.client_list()}
        self._stopped = False

    def subscribers(self) -> int:
        ((_, count),) = self._redis.pubsub_numsub(self.server_name)
        return int(count)

    def live_newcomers(self) -> list[dict[str, Any]]:
        """Connections opened since the watch began (the observer's), still open."""
        return [
            c
            for c in self._redis.client_list()
            if str(c["addr"]) not in self.before and str(c["addr"]) != self.me
        ]

    def assert_one_subscriber_only(self, runs: int = 1) -> None:
        """Exactly ``runs`` new connections are open, each subscribed, none a publisher."""
        new = self.live_newcomers()
        assert len(new) == runs, f"expected {runs} observer connection(s), got {new}"
        for c in new:
            assert int(c["sub"]) == 1 and int(c["psub"]) == 0, c
            assert not str(c.get("name", "")).endswith("-pub"), c

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.monitor.stop()
            self._redis.close()

    def assert_observer_silent(self, connections: int) -> dict[str, int]:
        """After the observer stopped: what its connections sent, and who published."""
        self.stop()
        lines = list(self.monitor.lines)
        addresses: dict[str, list[str]] = {}
        for text in lines:
            match = _ADDRESS.match(text)
            if match is None:
                continue
            address = match.group(1)
            if address in self.before or address == self.me:
                continue
            addresses.setdefault(address, []).append(text.split("] ", 1)[1])
        assert len(addresses) == connections, f"observer connections: {addresses}"
        pings = 0
        for address, commands in addresses.items():
            others = [c for c in commands if not c.startswith('"PING"')]
            pings += len(commands) - len(others)
            assert others == [f'"SUBSCRIBE" "{self.server_name}"'], (address, commands)
        publishes = self.monitor.publishes()
        assert [p for a, p in publishes if a in addresses] == []
        assert [p for _, p in publishes if "REPLICATE" in p] == [], "someone sent REPLICATE"
        return {"connections": len(addresses), "pings": pings, "synapse_publishes": len(publishes)}


@pytest.fixture
def watches() -> Iterator[list[RedisWatch]]:
    made: list[RedisWatch] = []
    yield made
    for watch in made:
        watch.stop()


# ---------------------------------------------------------------- the example as a process


class ObserverRun:
    """One run of ``examples/bridge_observer.py``: stdout and stderr in files."""

    def __init__(self, argv: list[str], directory: Path, label: str) -> None:
        self.out = directory / f"{label}.stdout"
        self.err = directory / f"{label}.stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=directory,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
            )
        self.started = time.monotonic()
        self.ready_after: float | None = None

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def lines(self) -> list[str]:
        """The complete lines printed so far."""
        text = self.text()
        return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        deadline = time.monotonic() + timeout
        while "ready" not in self.stderr().splitlines():
            if not self.running():
                raise AssertionError(
                    f"the observer exited with {self.proc.returncode} before ready:\n"
                    f"{self.stderr()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no 'ready' after {timeout}s:\n{self.stderr()[-3000:]}")
            await sleep(0.05)
        self.ready_after = time.monotonic() - self.started
        return self.ready_after

    async def wait_exit(self, timeout: float = 30.0, dump_threads: bool = False) -> int:
        """The exit code; after ``timeout`` the process is killed (first made
        to dump its threads' stacks, with ``dump_threads``) and this fails."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                dump = ""
                if dump_threads:
                    self.proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack
                    await sleep(2)
                    dump = "\n" + self.stderr()[-6000:]
                if self.running():
                    self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"the observer did not exit within {timeout}s{dump}")
            await sleep(0.05)
        return int(self.proc.returncode)

    async def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    async def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return await self.wait_exit(10)

    def assert_clean_stderr(self) -> None:
        err = self.stderr()
        assert "Traceback" not in err, err[-3000:]
        assert "(no content for" not in err, err[-3000:]
        assert "rows lost" not in err, err[-3000:]


class Observer:
    """The example's command line for one deployment and checkpoint, and its runs."""

    def __init__(self, t: Target, directory: Path, extra: Sequence[str] = ()) -> None:
        self.directory = directory
        self.checkpoint = directory / "observer.checkpoint"
        configs = [arg for path in t.files for arg in ("-c", str(path))]
        self.argv = [
            sys.executable,
            str(EXAMPLE),
            *configs,
            "--checkpoint",
            str(self.checkpoint),
            *extra,
        ]
        self.runs: list[ObserverRun] = []

    def spawn(self) -> ObserverRun:
        run = ObserverRun(self.argv, self.directory, f"run{len(self.runs) + 1}")
        self.runs.append(run)
        return run

    def lines(self) -> list[str]:
        return [text for run in self.runs for text in run.lines()]

    def kill_all(self) -> None:
        for run in self.runs:
            if run.running():
                run.proc.kill()
                run.proc.wait(timeout=10)


@pytest.fixture
def observers() -> Iterator[list[Observer]]:
    made: list[Observer] = []
    yield made
    for observer in made:
        observer.kill_all()


async def wait_for_lines(
    observer: Observer, expected: Sequence[str], timeout: float = ARRIVAL_TIMEOUT
) -> None:
    want = Counter(expected)

    def arrived() -> bool:
        got = Counter(observer.lines())
        return all(got[k] >= v for k, v in want.items())

    try:
        await wait_until(arrived, timeout=timeout, what="the observer to print every message")
    except AssertionError:
        got = Counter(observer.lines())
        missing = [k for k, v in want.items() if got[k] < v]
        raise AssertionError(
            f"{len(missing)} of {len(want)} lines never printed, e.g. {missing[:5]}; "
            f"printed {sum(got.values())} lines; stderr of the last run:\n"
            f"{observer.runs[-1].stderr()[-3000:]}"
        ) from None


async def sentinels(
    rooms: dict[str, list[str]], user: User, tag: str, expected: list[str]
) -> list[str]:
    """One last message per writer: once each is printed, anything sent
    before it on that writer has been too (delivery is in stream order)."""
    out = []
    for writer, room_ids in rooms.items():
        body = f"{tag} sentinel {writer}"
        await user.message(room_ids[0], body)
        out.append(line(room_ids[0], user, body))
    expected.extend(out)
    return out


# ---------------------------------------------------------------- scenario 1


@pytest_twisted.ensureDeferred
async def test_example_prints_every_message_once(
    target: Target, tmp_path: Path, observers: list[Observer], watches: list[RedisWatch]
) -> None:
    """Alone on Redis, the example prints every m.room.message sent after
    ``ready`` exactly once, with its room, sender and body, and nothing else
    (no state events, no other types); rooms on both persisters on the cluster."""
    watch = RedisWatch(target)
    watches.append(watch)
    observer = Observer(target, tmp_path)
    observers.append(observer)
    run = observer.spawn()
    alice, bob = await new_user(target.api, "alice"), await new_user(target.api, "bob")
    rooms = await rooms_per_writer(target, alice, per_writer=2, joiners=[bob])
    ready_after = await run.wait_ready()
    watch.assert_one_subscriber_only()
    tag = secrets.token_hex(4)
    expected: list[str] = []
    started = time.monotonic()
    every_room = [(w, r) for w, room_ids in rooms.items() for r in room_ids]
    for n in range(3):
        for user in (alice, bob):
            # Into every room at once: the persisters write concurrently.
            sends = []
            for writer, room in every_room:
                body = f"{tag} {writer} {n} from {user.user_id[1:6]}"
                sends.append(defer.ensureDeferred(user.message(room, body)))
                expected.append(line(room, user, body))
            await with_timeout(defer.gatherResults(sends), 60, "concurrent sends")
        # Not messages: never printed.
        first = next(iter(rooms.values()))[0]
        await alice.set_state(first, "m.room.topic", {"topic": f"{tag} topic {n}"})
        await bob.send(first, {"body": f"{tag} custom {n}"}, type="org.interop.custom")
    await sentinels(rooms, alice, tag, expected)
    await wait_for_lines(observer, expected)
    took = time.monotonic() - started
    printed = run.lines()
    assert Counter(printed) == Counter(expected), {
        "extra": list((Counter(printed) - Counter(expected)).elements()),
        "missing": list((Counter(expected) - Counter(printed)).elements()),
    }
    assert_in_order_per_room(printed, expected)
    run.proc.send_signal(signal.SIGINT)
    assert await run.wait_exit(30) == 0, "SIGINT: a clean stop"
    run.assert_clean_stderr()
    silent = watch.assert_observer_silent(connections=1)
    report(
        f"{target.kind}: ready after {ready_after:.2f}s; {len(expected)} messages on "
        f"{len(rooms)} writer(s) printed exactly once, in order per room, nothing else, "
        f"in {took:.2f}s; SIGINT exit 0; "
        f"redis: {silent}"
    )


# ---------------------------------------------------------------- scenario 2


class Sender:
    """Messages sent in a loop, round robin over rooms and users, until stopped."""

    def __init__(self, rooms: dict[str, list[str]], users: Sequence[User], tag: str) -> None:
        self.targets = [(w, r) for w, rs in rooms.items() for r in rs]
        self.users = list(users)
        self.tag = tag
        self.expected: list[str] = []
        #: line -> event ID
        self.ids: dict[str, str] = {}
        self.stop = False
        self.done: defer.Deferred[None] | None = None

    def start(self) -> Sender:
        """One loop per user, at the same time."""
        loops = [defer.ensureDeferred(self._loop(user)) for user in self.users]
        self.done = defer.gatherResults(loops, consumeErrors=True)
        return self

    async def _loop(self, user: User) -> None:
        for n in itertools.count():
            if self.stop:
                return
            writer, room = self.targets[n % len(self.targets)]
            body = f"{self.tag} loop {n} {writer} {user.user_id[1:6]}"
            event_id = await user.message(room, body)
            self.expected.append(line(room, user, body))
            self.ids[self.expected[-1]] = event_id
            await sleep(0.02)

    async def sent_more(self, count: int, timeout: float = 30.0) -> None:
        goal = len(self.expected) + count
        await wait_until(
            lambda: len(self.expected) >= goal or (self.done is not None and self.done.called),
            timeout=timeout,
            what=f"{count} more messages sent",
        )

    async def finish(self) -> None:
        self.stop = True
        assert self.done is not None
        await with_timeout(self.done, 30, "the sending loop to end")


#: SIGKILLs in the crash scenario, each right after a line was printed
#: (when the batch's checkpoint save is most likely still under way).
KILLS = 3


@pytest_twisted.ensureDeferred
async def test_sigkill_mid_traffic_then_restart_misses_nothing(
    target: Target, tmp_path: Path, observers: list[Observer], watches: list[RedisWatch]
) -> None:
    """SIGKILL while messages are being sent, restart from the checkpoint
    while they keep coming (three times): every message is printed, at least
    once over the runs.  A line is printed again only if it is the last one
    the killed run printed and the checkpoint on disk at the kill did not
    include it yet (handled, not acknowledged): one batch, one message here.
    Every other line the killed run printed was in its checkpoint."""
    watch = RedisWatch(target)
    watches.append(watch)
    observer = Observer(target, tmp_path)
    observers.append(observer)
    run = observer.spawn()
    alice, bob = await new_user(target.api, "alice"), await new_user(target.api, "bob")
    rooms = await rooms_per_writer(target, alice, per_writer=1, joiners=[bob])
    await run.wait_ready()
    tag = secrets.token_hex(4)
    sender = Sender(rooms, [alice, bob], tag).start()
    killed: list[tuple[list[str], dict[str, int]]] = []  # (lines, checkpoint at the kill)
    down_counts = []
    for _ in range(KILLS):
        goal = len(run.lines()) + 6
        await wait_until(lambda r=run, g=goal: len(r.lines()) >= g, timeout=30, what="6 more lines")
        await run.kill()
        assert run.text().endswith("\n"), "SIGKILL left a torn line"
        store = FileCheckpointStore(observer.checkpoint, server_name=target.server_name)
        saved = store.load()
        store.close()
        assert saved is not None
        killed.append((run.lines(), dict(saved["events"])))
        sent_at_kill = len(sender.expected)
        await sender.sent_more(5)
        run = observer.spawn()
        await run.wait_ready()
        down_counts.append(len(sender.expected) - sent_at_kill)
    await sender.sent_more(6 * len(rooms))
    await sender.finish()
    expected = list(sender.expected)
    await sentinels(rooms, alice, tag, expected)
    await wait_for_lines(observer, expected)
    assert await run.terminate() == 0
    run.assert_clean_stderr()

    everything = Counter(observer.lines())
    assert set(everything) == set(expected), {
        "extra": sorted(set(everything) - set(expected)),
        "missing": sorted(set(expected) - set(everything)),
    }
    for each in observer.runs:
        assert max(Counter(each.lines()).values()) == 1, f"{each.out.name} printed a line twice"
    where = target.event_positions(list(sender.ids.values()))
    token = {text: where[event_id] for text, event_id in sender.ids.items()}
    repeats_expected: list[str] = []
    for lines, checkpoint in killed:
        *acknowledged, last = [text for text in lines if text in token]
        for text in acknowledged:
            writer, tok = token[text]
            assert tok <= checkpoint[writer], f"printed but not in the checkpoint: {text}"
        writer, tok = token[last]
        if tok > checkpoint[writer]:
            repeats_expected.append(last)
    repeated = sorted(k for k, v in everything.items() if v > 1)
    assert all(v <= 2 for v in everything.values())
    assert repeated == sorted(repeats_expected), (repeated, repeats_expected)
    silent = watch.assert_observer_silent(connections=KILLS + 1)
    report(
        f"{target.kind}: {KILLS} SIGKILLs after {[len(lines) for lines, _ in killed]} lines; "
        f"{down_counts} sent while down/restarting; {len(expected)} messages in all, none "
        f"missing; printed again: {len(repeated)} (each the killed run's last, unacknowledged "
        f"line) {repeated}; redis: {silent}"
    )


# ---------------------------------------------------------------- scenario 3


@pytest_twisted.ensureDeferred
async def test_clean_stop_and_restart_is_exactly_once(
    target: Target, tmp_path: Path, observers: list[Observer], watches: list[RedisWatch]
) -> None:
    """SIGTERM: exit 0 with the last checkpoint saved.  Messages sent while it
    is down are printed by the next run, and over the two runs every message
    is printed exactly once."""
    watch = RedisWatch(target)
    watches.append(watch)
    observer = Observer(target, tmp_path)
    observers.append(observer)
    first = observer.spawn()
    alice, bob = await new_user(target.api, "alice"), await new_user(target.api, "bob")
    rooms = await rooms_per_writer(target, alice, per_writer=1, joiners=[bob])
    await first.wait_ready()
    tag = secrets.token_hex(4)
    expected: list[str] = []
    for n in range(3):
        for room_ids in rooms.values():
            for user in (alice, bob):
                body = f"{tag} before {n} {user.user_id[1:6]}"
                await user.message(room_ids[0], body)
                expected.append(line(room_ids[0], user, body))
    await wait_for_lines(observer, expected)
    stopping = time.monotonic()
    assert await first.terminate() == 0
    stop_took = time.monotonic() - stopping
    first.assert_clean_stderr()
    saved = FileCheckpointStore(observer.checkpoint, server_name=target.server_name)
    at_stop = saved.load()
    saved.close()
    assert at_stop is not None and set(at_stop["events"]) >= set(target.writers), at_stop

    down: list[str] = []
    for n in range(3):
        for room_ids in rooms.values():
            for user in (alice, bob):
                body = f"{tag} while down {n} {user.user_id[1:6]}"
                await user.message(room_ids[0], body)
                down.append(line(room_ids[0], user, body))
    expected += down
    second = observer.spawn()
    await second.wait_ready()
    # A read-only observer learns that a writer moved on only from the
    # writer's own traffic (test_restart_catches_up_without_new_traffic):
    # one more message per writer makes it fetch what it missed.
    await sentinels(rooms, alice, tag, expected)
    await wait_for_lines(observer, expected)
    assert await second.terminate() == 0
    second.assert_clean_stderr()
    printed = observer.lines()
    assert Counter(printed) == Counter(expected), {
        "extra": list((Counter(printed) - Counter(expected)).elements()),
        "missing": list((Counter(expected) - Counter(printed)).elements()),
    }
    assert set(second.lines()) >= set(down)
    assert_in_order_per_room(printed, expected)
    silent = watch.assert_observer_silent(connections=2)
    report(
        f"{target.kind}: SIGTERM exit 0 in {stop_took:.2f}s; {len(down)} sent while down; "
        f"{len(expected)} in all printed exactly once over 2 runs, in order per room; "
        f"redis: {silent}"
    )


@pytest_twisted.ensureDeferred
async def test_restart_catches_up_without_new_traffic(
    target: Target, tmp_path: Path, observers: list[Observer]
) -> None:
    """After a clean stop, messages sent while the example was down are
    printed by the next run on their own, with nothing sent after it starts."""
    observer = Observer(target, tmp_path)
    observers.append(observer)
    first = observer.spawn()
    alice = await new_user(target.api, "alice")
    rooms = await rooms_per_writer(target, alice, per_writer=1)
    await first.wait_ready()
    tag = secrets.token_hex(4)
    before = [line(r[0], alice, f"{tag} before {w}") for w, r in rooms.items()]
    for writer, room_ids in rooms.items():
        await alice.message(room_ids[0], f"{tag} before {writer}")
    await wait_for_lines(observer, before)
    assert await first.terminate() == 0
    down = [line(r[0], alice, f"{tag} down {w}") for w, r in rooms.items()]
    for writer, room_ids in rooms.items():
        await alice.message(room_ids[0], f"{tag} down {writer}")
    second = observer.spawn()
    await second.wait_ready()
    try:
        await wait_for_lines(observer, before + down, timeout=CATCH_UP_WITHOUT_TRAFFIC)
    finally:
        got = len(set(second.lines()) & set(down))
        report(
            f"{target.kind}: {got}/{len(down)} messages sent while down printed "
            f"{CATCH_UP_WITHOUT_TRAFFIC}s after the restart's ready, without new traffic"
        )
        assert await second.terminate() == 0


#: How long a restarted observer is given to print, on its own, what was
#: sent while it was down.
CATCH_UP_WITHOUT_TRAFFIC = 5.0


def assert_in_order_per_room(printed: Sequence[str], expected: Sequence[str]) -> None:
    """Per room, the lines come in the order the messages were sent."""
    rooms = {text.split(" ", 1)[0] for text in expected}
    for room in rooms:
        mine = [text for text in printed if text.startswith(room + " ")]
        assert mine == [text for text in expected if text.startswith(room + " ")], room


# ---------------------------------------------------------------- in-process clients


@attrs.define
class Seen:
    """What a full-events handler was given."""

    calls: Counter[str] = attrs.Factory(Counter)
    call_times: dict[str, list[float]] = attrs.Factory(dict)
    handled: list[str] = attrs.Factory(list)
    tokens: dict[str, tuple[str, int]] = attrs.Factory(dict)
    event_ids: dict[str, str] = attrs.Factory(dict)


def failing_on(poison: str, seen: Seen) -> Callable[[EventsReceived], None]:
    """A handler that records bodies and raises on the message ``poison``."""

    def handler(batch: EventsReceived) -> None:
        for event in batch.events:
            assert isinstance(event, FullEvent), event
            body = str(event.content.get("body", ""))
            seen.calls[body] += 1
            seen.call_times.setdefault(body, []).append(time.monotonic())
            seen.tokens[body] = (batch.writer, batch.token)
            seen.event_ids[body] = event.event_id
            if body == poison:
                raise RuntimeError(f"refusing {body!r}")
            seen.handled.append(body)

    return handler


async def stop_client(client: ReplicationClient) -> None:
    await with_timeout(client.stop(), 30, "client.stop()")
    if client.http is not None:
        await client.http.close()


@pytest_twisted.ensureDeferred
async def test_failing_batch_is_retried_then_dead_lettered(
    target: Target, tmp_path: Path, watches: list[RedisWatch]
) -> None:
    """A handler that raises on one message: the batch is run 1 + retries
    times, then recorded with its rows in a real dead-letter store (a JSON
    lines file on main_only, SQLite on the cluster), and the messages after
    it still arrive, in order; the checkpoint moves past it."""
    watch = RedisWatch(target)
    watches.append(watch)
    config = target.config
    source = target.source()
    store_path = tmp_path / ("dead.jsonl" if target.kind == "main_only" else "dead.db")
    store_type = FileDeadLetterStore if target.kind == "main_only" else SqliteDeadLetterStore
    checkpoint = tmp_path / "checkpoint"
    tag = secrets.token_hex(4)
    poison = f"{tag} poison"
    seen = Seen()
    policy = HandlerFailurePolicy(retries=2, base_delay=0.05, max_delay=0.2, then="dead_letter")
    client = ReplicationClient(
        reactor,
        config,
        streams={"events"},
        read_only=True,
        checkpoint=FileCheckpointStore(checkpoint, server_name=config.server_name),
        dead_letters=store_type(store_path, server_name=config.server_name),
        failure_policy=policy,
        seed_from=source,
    )
    client.on_events(
        failing_on(poison, seen), source=source, filter=EventFilter(types=["m.room.message"])
    )
    try:
        await client.start()
        await with_timeout(client.wait_ready(20), 25, "ready")
        watch.assert_one_subscriber_only()
        alice = await new_user(target.api, "alice")
        rooms = await rooms_per_writer(target, alice, per_writer=1)
        room = rooms[target.writers[0]][0]
        bodies = [f"{tag} m1", f"{tag} m2", poison, f"{tag} m3", f"{tag} m4"]
        for body in bodies:
            await alice.message(room, body)
        others = [f"{tag} elsewhere {w}" for w in target.writers[1:]]
        for writer, body in zip(target.writers[1:], others, strict=True):
            await alice.message(rooms[writer][0], body)
        good = [b for b in bodies if b != poison]
        await wait_until(
            lambda: set(seen.handled) >= set(good + others) and client.counters.dead_letters == 1,
            timeout=ARRIVAL_TIMEOUT,
            what="the messages after the poison, and its dead letter",
        )
        assert [b for b in seen.handled if b in good] == good, "in order, each once"
        assert seen.calls[poison] == 1 + policy.retries
        assert all(seen.calls[b] == 1 for b in good + others), seen.calls
        counters = client.counters
        assert counters.handler_retries == policy.retries
        assert counters.handler_errors == 1 + policy.retries
        assert counters.dead_letters == 1
        times = seen.call_times[poison]
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
        assert all(g >= 0.04 for g in gaps), gaps
        writer, token = seen.tokens[poison]
        await wait_until(
            lambda: client.positions()["events"][writer] >= seen.tokens[good[-1]][1],
            timeout=10,
            what="the position past m4",
        )
    finally:
        await stop_client(client)
        source.close()
    letters = store_type(store_path, server_name=config.server_name).letters()
    assert len(letters) == 1, letters
    (letter,) = letters
    assert (letter.stream, letter.writer, letter.token) == ("events", writer, token)
    assert letter.attempts == 1 + policy.retries
    assert "refusing" in letter.error and poison in letter.error
    rows = [parse_row("events", raw) for raw in letter.rows]
    assert [r.event_id for r in rows if isinstance(r, EventRow)] == [seen.event_ids[poison]]
    saved = FileCheckpointStore(checkpoint, server_name=config.server_name)
    after = saved.load()
    saved.close()
    assert after is not None and after["events"][writer] >= seen.tokens[good[-1]][1] > token
    silent = watch.assert_observer_silent(connections=1)
    report(
        f"{target.kind}: poison at {writer}/{token} called {seen.calls[poison]} times "
        f"(retry gaps {gaps}s), dead-lettered in {store_path.name} with "
        f"{len(letter.rows)} row(s); {len(good + others)} others handled once; redis: {silent}"
    )


@pytest_twisted.ensureDeferred
async def test_failing_batch_stops_the_client_before_it(
    target: Target, tmp_path: Path, watches: list[RedisWatch]
) -> None:
    """then="stop" and no dead-letter store: after the retries the client
    stops, ``finished()`` fails with DeliveryStoppedError, nothing after the
    failed batch is handled, and the checkpoint stays before it."""
    watch = RedisWatch(target)
    watches.append(watch)
    config = target.config
    source = target.source()
    checkpoint = tmp_path / "checkpoint"
    tag = secrets.token_hex(4)
    poison = f"{tag} poison"
    seen = Seen()
    policy = HandlerFailurePolicy(retries=1, base_delay=0.05, then="stop")
    client = ReplicationClient(
        reactor,
        config,
        streams={"events"},
        read_only=True,
        checkpoint=FileCheckpointStore(checkpoint, server_name=config.server_name),
        failure_policy=policy,
        seed_from=source,
    )
    client.on_events(
        failing_on(poison, seen), source=source, filter=EventFilter(types=["m.room.message"])
    )
    finished = client.finished()
    outcome: list[Any] = []
    finished.addBoth(outcome.append)
    try:
        await client.start()
        await with_timeout(client.wait_ready(20), 25, "ready")
        watch.assert_one_subscriber_only()
        alice = await new_user(target.api, "alice")
        rooms = await rooms_per_writer(target, alice, per_writer=1)
        room = rooms[target.writers[0]][0]
        bodies = [f"{tag} m1", f"{tag} m2", poison, f"{tag} m3"]
        for body in bodies:
            await alice.message(room, body)
        await wait_until(lambda: bool(outcome), timeout=ARRIVAL_TIMEOUT, what="finished()")
        (result,) = outcome
        assert isinstance(result, Failure), result
        assert result.check(DeliveryStoppedError), result
        writer, token = seen.tokens[poison]
        assert str(token) in str(result.value) and writer in str(result.value)
        assert seen.calls[poison] == 1 + policy.retries
        newest = newest_tokens(target, [room])[room]
        assert newest > token, "m3 is in the database, after the poison"
        await sleep(0.5)  # and it is never handed out
        assert seen.handled == [f"{tag} m1", f"{tag} m2"], seen.handled
        assert f"{tag} m3" not in seen.calls
    finally:
        await stop_client(client)
        source.close()
    saved = FileCheckpointStore(checkpoint, server_name=config.server_name)
    after = saved.load()
    saved.close()
    assert after is not None
    assert seen.tokens[f"{tag} m2"][1] <= after["events"][writer] < token, (after, token)

    # A fixed handler, resumed from that checkpoint, gets the failed batch first.
    source = target.source()
    again = Seen()
    client = ReplicationClient(
        reactor,
        config,
        streams={"events"},
        read_only=True,
        checkpoint=FileCheckpointStore(checkpoint, server_name=config.server_name),
        seed_from=source,
    )
    client.on_events(
        failing_on("(nothing)", again), source=source, filter=EventFilter(types=["m.room.message"])
    )
    try:
        await client.start()
        await with_timeout(client.wait_ready(20), 25, "ready")
        # The writer's next RDATA makes the resumed client fetch what it missed.
        await alice.message(room, f"{tag} nudge")
        resumed = [poison, f"{tag} m3", f"{tag} nudge"]
        await wait_until(
            lambda: len(again.handled) >= len(resumed), timeout=ARRIVAL_TIMEOUT, what="resumed"
        )
        assert again.handled == resumed
    finally:
        await stop_client(client)
        source.close()
    silent = watch.assert_observer_silent(connections=2)
    report(
        f"{target.kind}: stopped with DeliveryStoppedError after {seen.calls[poison]} calls; "
        f"checkpoint {after['events'][writer]} < poison token {token} "
        f"(m3 persisted at {newest}, never handled); resumed from it: {again.handled}; "
        f"redis: {silent}"
    )


def newest_tokens(t: Target, rooms: Sequence[str]) -> dict[str, int]:
    """The newest stream token of each room, from Synapse's database."""
    if t.deployment.database is not None:
        rows = t.deployment.database.query(
            "SELECT room_id, max(stream_ordering) FROM events WHERE room_id = ANY(%s) "
            "GROUP BY room_id",
            (list(rooms),),
        )
        return {r: int(m) for r, m in rows}
    raw = read_config_files(t.deployment.shared_config)
    path = Path(raw["database"]["args"]["database"]).absolute()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        marks = ",".join("?" * len(rooms))
        rows = db.execute(
            "SELECT room_id, max(stream_ordering) FROM events "
            f"WHERE room_id IN ({marks}) GROUP BY room_id",
            list(rooms),
        ).fetchall()
    finally:
        db.close()
    return {r: int(m) for r, m in rows}


# ---------------------------------------------------------------- scenario 5: filters


class CountingSource:
    """An event source that records which events it was asked for."""

    def __init__(self, inner: EventSource) -> None:
        self.inner = inner
        self.asked: list[str] = []
        self._lock = threading.Lock()

    def fetch(self, event_ids: Sequence[str]) -> dict[str, FullEvent]:
        with self._lock:
            self.asked.extend(event_ids)
        return self.inner.fetch(event_ids)

    def positions(self) -> dict[str, dict[str, int]]:
        return self.inner.positions()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest_twisted.ensureDeferred
async def test_filters_pass_only_matching_events(target: Target, watches: list[RedisWatch]) -> None:
    """One read-only client, one handler per EventFilter: by room, by type
    wildcard (``m.room.*``), by sender, by membership (joins only, and
    "leave" alone, which lets non-member events through).  Each handler gets
    exactly the events of our rooms that match, nothing else; what a room,
    type or membership filter refuses is never fetched from the database."""
    watch = RedisWatch(target)
    watches.append(watch)
    config = target.config
    seed = target.source()
    alice = await new_user(target.api, "alice")
    bob = await new_user(target.api, "bob")
    carol = await new_user(target.api, "carol")
    filters: dict[str, EventFilter] = {}
    got: dict[str, list[FullEvent]] = {}
    sources: dict[str, CountingSource] = {}
    client = ReplicationClient(reactor, config, streams={"events"}, read_only=True, seed_from=seed)

    def collect(name: str) -> Callable[[EventsReceived], None]:
        def handler(batch: EventsReceived) -> None:
            for event in batch.events:
                assert isinstance(event, FullEvent), event
                got[name].append(event)

        return handler

    def add(name: str, flt: EventFilter) -> None:
        filters[name], got[name] = flt, []
        sources[name] = CountingSource(target.source())
        client.on_events(collect(name), source=sources[name], filter=flt)

    # The rooms exist before the client starts ("from now": their first
    # events are not delivered); everything from bob's join on is.
    rooms = await rooms_per_writer(target, alice, per_writer=1)
    room_a = rooms[target.writers[0]][0]
    if len(target.writers) > 1:
        room_b = rooms[target.writers[-1]][0]
    else:
        room_b = await alice.create_room(preset="public_chat")
    add("room", EventFilter(rooms=[room_a]))
    add("type", EventFilter(types=["m.room.*"]))
    add("sender", EventFilter(senders=[bob.user_id]))
    add("joins", EventFilter(types=["m.room.member"], memberships=["join"]))
    add("leaves", EventFilter(memberships=["leave"]))
    try:
        await client.start()
        await with_timeout(client.wait_ready(20), 25, "ready")
        watch.assert_one_subscriber_only()
        tag = secrets.token_hex(4)
        for room in (room_a, room_b):
            await bob.join(room)
            message = await alice.message(room, f"{tag} alice in {room}")
            await bob.message(room, f"{tag} bob in {room}")
            await bob.send(room, {"k": tag}, type="org.interop.custom")
            await alice.set_state(room, "m.room.topic", {"topic": tag})
            await alice.send(
                room,
                {"m.relates_to": {"rel_type": "m.annotation", "event_id": message, "key": "x"}},
                type="m.reaction",
            )
            await alice.call(
                "POST", f"/_matrix/client/v3/rooms/{q(room)}/invite", {"user_id": carol.user_id}
            )
            await carol.join(room)
        await bob.call("POST", f"/_matrix/client/v3/rooms/{q(room_b)}/leave", {})
        last = await alice.message(room_a, f"{tag} last")
        # Every event of the two rooms from bob's first join on, as the client API shows it.
        timeline: list[dict[str, Any]] = []
        for room in (room_a, room_b):
            events = await alice.messages(room)
            start = next(
                i
                for i, e in enumerate(events)
                if e["type"] == "m.room.member" and e["state_key"] == bob.user_id
            )
            timeline += events[start:]
        ids = [e["event_id"] for e in timeline]
        where = target.event_positions(ids)
        newest: dict[str, int] = {}
        for writer, token in where.values():
            newest[writer] = max(newest.get(writer, 0), token)
        await wait_until(
            lambda: all(client.positions()["events"].get(w, 0) >= tok for w, tok in newest.items()),
            timeout=ARRIVAL_TIMEOUT,
            what="the client to process every event of our rooms",
        )
        assert last in ids
    finally:
        await stop_client(client)
        seed.close()
        for s in sources.values():
            s.close()

    def membership(e: dict[str, Any]) -> str | None:
        return e["content"].get("membership") if e["type"] == "m.room.member" else None

    wanted: dict[str, Callable[[dict[str, Any]], bool]] = {
        "room": lambda e: e["room_id"] == room_a,
        "type": lambda e: e["type"].startswith("m.room."),
        "sender": lambda e: e["sender"] == bob.user_id,
        "joins": lambda e: membership(e) == "join",
        "leaves": lambda e: e["type"] != "m.room.member" or membership(e) == "leave",
    }
    ours = set(ids)
    summary = {}
    for name, test in wanted.items():
        expected = [e["event_id"] for e in timeline if test(e)]
        received = [e.event_id for e in got[name] if e.event_id in ours]
        foreign = [e for e in got[name] if e.event_id not in ours]
        assert Counter(received) == Counter(expected), (
            name,
            {"extra": set(received) - set(expected), "missing": set(expected) - set(received)},
        )
        assert len(received) == len(set(received)), f"{name}: an event twice"
        assert all(filters[name].accepts(e) for e in foreign), (name, foreign)
        refused = ours - set(expected)
        asked = set(sources[name].asked) & ours
        if name == "sender":
            # Only the full event names the sender: everything is fetched.
            assert asked == ours, name
        else:
            assert asked & refused == set(), f"{name}: refused rows were fetched"
            assert asked == set(expected), name
        summary[name] = f"{len(received)}/{len(ours)} passed, {len(asked)} fetched"
    assert {wanted["sender"](e) for e in timeline} == {True, False}
    assert {membership(e) for e in timeline} >= {"join", "invite", "leave"}
    silent = watch.assert_observer_silent(connections=1)
    report(f"{target.kind}: filters {summary}; redis: {silent}")


# ---------------------------------------------------------------- scenario 6: admin API


@pytest_twisted.ensureDeferred
async def test_example_with_the_admin_api_prints_the_same_lines(
    target: Target, tmp_path: Path, observers: list[Observer], watches: list[RedisWatch]
) -> None:
    """With ``--admin-url`` and ``--admin-token-file`` (a server admin's token),
    the example prints the same ``ROOM_ID SENDER: BODY`` lines.  The admin API
    has no positions, so it cannot be seeded: it is ready once every writer's
    own traffic has reached it, and the first message of each writer is
    printed whole all the same."""
    watch = RedisWatch(target)
    watches.append(watch)
    admin = await register_admin(target)
    token_file = tmp_path / "admin.token"
    token_file.write_text(admin.access_token + "\n")
    token_file.chmod(0o600)
    observer = Observer(
        target,
        tmp_path,
        [
            "--admin-url",
            target.deployment.client_urls["master"],
            "--admin-token-file",
            str(token_file),
        ],
    )
    observers.append(observer)
    alice, bob = await new_user(target.api, "alice"), await new_user(target.api, "bob")
    rooms = await rooms_per_writer(target, alice, per_writer=1, joiners=[bob])
    before = watch.subscribers()
    run = observer.spawn()
    await wait_until(
        lambda: watch.subscribers() > before,
        timeout=READY_TIMEOUT,
        what="the observer to subscribe",
    )
    tag = secrets.token_hex(4)
    expected: list[str] = []
    for n in range(3):
        for room_ids in rooms.values():
            for user in (alice, bob):
                body = f"{tag} admin {n} {user.user_id[1:6]}"
                await user.message(room_ids[0], body)
                expected.append(line(room_ids[0], user, body))
    if release_facts().release < ADMIN_FETCH_EVENT_SINCE:
        # An older release: the example says why it cannot read events, and prints none.
        await wait_until(
            lambda: "has no admin API to fetch an event" in run.stderr(),
            timeout=READY_TIMEOUT,
            what="the example to say why",
        )
        assert run.lines() == []
        return
    await run.wait_ready(30)
    await sentinels(rooms, alice, tag, expected)
    await wait_for_lines(observer, expected)
    printed = run.lines()
    assert Counter(printed) == Counter(expected), {
        "extra": list((Counter(printed) - Counter(expected)).elements()),
        "missing": list((Counter(expected) - Counter(printed)).elements()),
    }
    assert_in_order_per_room(printed, expected)
    assert await run.terminate() == 0
    run.assert_clean_stderr()
    assert admin.access_token not in run.stderr() + run.text()
    silent = watch.assert_observer_silent(connections=1)
    report(f"{target.kind}: admin API: {len(expected)} lines exactly once; redis: {silent}")


# ---------------------------------------------------------------- scenario 7: database down


class TcpProxy:
    """A TCP forwarder to ``upstream``, in threads, that can go down and up.

    Down: every open connection is cut, and new ones are accepted and closed
    at once (``refuse``) or accepted and never answered (``silent``); or
    (``blackhole``) open connections stay open but nothing gets through
    either way, and new ones are never answered (a network partition), until
    :meth:`up` cuts them.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._up = True
        self._mode = "refuse"
        self._closed = False
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._held: list[socket.socket] = []
        self.accepted = 0
        self.turned_away = 0
        self._thread = threading.Thread(target=self._accept_loop, name="pg-proxy", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                up, mode = self._up, self._mode
                if not up:
                    self.turned_away += 1
                    if mode in ("silent", "blackhole"):
                        self._held.append(conn)
                    else:
                        conn.close()
                    continue
                self.accepted += 1
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                conn.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._open += [conn, server]
            for a, b in ((conn, server), (server, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self._mode == "blackhole" and not self._up:
                    continue  # lost in the partition
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def down(self, mode: str = "refuse") -> None:
        with self._lock:
            self._up, self._mode = False, mode
            if mode == "blackhole":
                return
            cut, self._open = self._open, []
        self._cut(cut)

    @staticmethod
    def _cut(sockets: list[socket.socket]) -> None:
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def up(self) -> None:
        with self._lock:
            cut: list[socket.socket] = []
            if not self._up and self._mode == "blackhole":
                cut, self._open = self._open, []
            self._up = True
            held, self._held = self._held, []
        self._cut(cut)
        for s in held:
            s.close()

    def close(self) -> None:
        self._closed = True
        self.down()
        self.up()
        self._listener.close()
        self._thread.join(timeout=5)


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["refuse", "silent"])
@pytest_twisted.ensureDeferred
async def test_database_unreachable_for_a_while(
    cluster_target: Target, mode: str, tmp_path: Path, watches: list[RedisWatch]
) -> None:
    """The observer reads Synapse's PostgreSQL through a proxy, which cuts
    every connection and then refuses (or silently holds) new ones for a few
    seconds.  The messages sent meanwhile are handled after it is back, once
    each and in order; while it is down neither ``positions()`` nor the saved
    checkpoint moves past them.  The real PostgreSQL keeps serving Synapse."""
    t = cluster_target
    db = t.deployment.database
    assert db is not None
    watch = RedisWatch(t)
    watches.append(watch)
    proxy = TcpProxy((db.host, db.port))
    config = t.config
    conninfo = f"host=127.0.0.1 port={proxy.port} user={db.user} dbname={db.name}"
    if db.password:
        conninfo += f" password={db.password}"
    source = PostgresEventSource(conninfo, connect_timeout=2, writers=PERSISTERS)
    checkpoint = tmp_path / "checkpoint"
    fetch_policy = EventFetchPolicy(unavailable_backoff=ReconnectBackoff(0.2, 1.0))
    handled: list[tuple[str, str, int]] = []  # (body, writer, token)

    def handler(batch: EventsReceived) -> None:
        for event in batch.events:
            assert isinstance(event, FullEvent), event
            handled.append((str(event.content.get("body")), batch.writer, batch.token))

    client = ReplicationClient(
        reactor,
        config,
        streams={"events"},
        read_only=True,
        checkpoint=FileCheckpointStore(checkpoint, server_name=config.server_name),
        seed_from=source,
    )
    client.on_events(
        handler, source=source, filter=EventFilter(types=["m.room.message"]), policy=fetch_policy
    )
    try:
        await client.start()
        await with_timeout(client.wait_ready(20), 25, "ready")
        assert proxy.accepted >= 1, "seeded through the proxy"
        watch.assert_one_subscriber_only()
        alice = await new_user(t.api, "alice")
        rooms = await rooms_per_writer(t, alice, per_writer=1)
        tag = secrets.token_hex(4)
        sent: dict[str, list[str]] = {w: [] for w in PERSISTERS}

        async def send(phase: str, count: int) -> list[str]:
            ids, bodies = [], []
            for n in range(count):
                for writer, room_ids in rooms.items():
                    body = f"{tag} {phase} {n} {writer}"
                    ids.append(await alice.message(room_ids[0], body))
                    sent[writer].append(body)
                    bodies.append(body)
            return bodies

        def bodies_handled() -> list[str]:
            return [b for b, _, _ in handled]

        before = await send("before", 2)
        await wait_until(
            lambda: set(bodies_handled()) >= set(before), timeout=20, what="before messages"
        )
        failures_before = client.counters.event_source_failures
        proxy.down(mode)
        went_down = time.monotonic()
        during = await send("during", 3)
        # Where Synapse put them, read directly (the real database is up).
        all_ids = [
            e["event_id"]
            for room_ids in rooms.values()
            for e in await alice.messages(room_ids[0])
            if e["type"] == "m.room.message" and " during " in e["content"].get("body", "")
        ]
        where = t.event_positions(all_ids)
        first_during = {w: min(tok for ww, tok in where.values() if ww == w) for w in PERSISTERS}
        await wait_until(
            lambda: client.counters.event_source_failures >= failures_before + 2,
            timeout=20,
            what="the source to fail while the proxy is down",
        )
        while time.monotonic() - went_down < 3.0:
            await sleep(0.1)
        assert not set(bodies_handled()) & set(during), "handled while the database was down"
        positions = client.positions()["events"]
        saved_store = FileCheckpointStore(checkpoint, server_name=config.server_name)
        saved = saved_store.load()
        saved_store.close()
        assert saved is not None
        for writer in PERSISTERS:
            assert positions[writer] < first_during[writer], (positions, first_during)
            assert saved["events"][writer] < first_during[writer], (saved, first_during)
        failures_down = client.counters.event_source_failures - failures_before
        down_for = time.monotonic() - went_down
        proxy.up()
        came_back = time.monotonic()
        await wait_until(
            lambda: set(bodies_handled()) >= set(during),
            timeout=ARRIVAL_TIMEOUT,
            what="the messages sent while the database was down",
        )
        recovered_in = time.monotonic() - came_back
        after = await send("after", 1)
        await wait_until(
            lambda: set(bodies_handled()) >= set(after), timeout=20, what="after messages"
        )
    finally:
        await stop_client(client)
        source.close()
        proxy.close()
    everything = before + during + after
    assert Counter(bodies_handled()) == Counter(everything), Counter(bodies_handled())
    for writer in PERSISTERS:
        mine = [(b, tok) for b, w, tok in handled if w == writer]
        assert [b for b, _ in mine] == sent[writer], "in order per writer"
        assert [tok for _, tok in mine] == sorted(tok for _, tok in mine)
    saved_store = FileCheckpointStore(checkpoint, server_name=config.server_name)
    final = saved_store.load()
    saved_store.close()
    assert final is not None
    for writer in PERSISTERS:
        assert final["events"][writer] >= max(tok for b, w, tok in handled if w == writer)
    silent = watch.assert_observer_silent(connections=1)
    report(
        f"cluster, {mode}: database down {down_for:.1f}s, {failures_down} source failures, "
        f"{proxy.turned_away} connections turned away; {len(during)} messages sent meanwhile "
        f"arrived {recovered_in:.2f}s after it came back; {len(everything)} once each; "
        f"redis: {silent}"
    )


def proxied_conninfo(t: Target, proxy: TcpProxy) -> str:
    db = t.deployment.database
    assert db is not None
    conninfo = f"host=127.0.0.1 port={proxy.port} user={db.user} dbname={db.name}"
    return conninfo + (f" password={db.password}" if db.password else "")


@pytest.mark.cluster
@pytest_twisted.ensureDeferred
async def test_example_sigterm_while_the_database_is_down(
    cluster_target: Target, tmp_path: Path, observers: list[Observer], watches: list[RedisWatch]
) -> None:
    """The example (``--database`` through the proxy) is sent SIGTERM while
    the database refuses connections and a message waits for its content:
    it exits 0, and the next run, with the database back, prints that
    message exactly once."""
    t = cluster_target
    db = t.deployment.database
    assert db is not None
    watch = RedisWatch(t)
    watches.append(watch)
    proxy = TcpProxy((db.host, db.port))
    observer = Observer(t, tmp_path, ["--database", proxied_conninfo(t, proxy)])
    observers.append(observer)
    try:
        first = observer.spawn()
        alice = await new_user(t.api, "alice")
        rooms = await rooms_per_writer(t, alice, per_writer=1)
        await first.wait_ready()
        tag = secrets.token_hex(4)
        expected: list[str] = []
        for writer, room_ids in rooms.items():
            await alice.message(room_ids[0], f"{tag} before {writer}")
            expected.append(line(room_ids[0], alice, f"{tag} before {writer}"))
        await wait_for_lines(observer, expected)
        proxy.down("refuse")
        during = []
        for writer, room_ids in rooms.items():
            await alice.message(room_ids[0], f"{tag} during {writer}")
            during.append(line(room_ids[0], alice, f"{tag} during {writer}"))
        expected += during
        await wait_until(
            lambda: "event source unavailable" in first.stderr(),
            timeout=20,
            what="the example to find the database down",
        )
        assert not set(first.lines()) & set(during)
        stopping = time.monotonic()
        assert await first.terminate(timeout=60) == 0
        stop_took = time.monotonic() - stopping
        assert "Traceback" not in first.stderr()
        proxy.up()
        second = observer.spawn()
        await second.wait_ready()
        await sentinels(rooms, alice, tag, expected)
        await wait_for_lines(observer, expected)
        assert await second.terminate() == 0
        second.assert_clean_stderr()
    finally:
        proxy.close()
    printed = observer.lines()
    assert Counter(printed) == Counter(expected), printed
    assert_in_order_per_room(printed, expected)
    silent = watch.assert_observer_silent(connections=2)
    report(
        f"cluster: SIGTERM while the database refuses: exit 0 after {stop_took:.2f}s "
        f"(the drain timeout is 30 s); the {len(during)} waiting messages printed once by "
        f"the next run; redis: {silent}"
    )


@pytest.mark.cluster
@pytest_twisted.ensureDeferred
async def test_stop_is_prompt_while_the_database_is_down(
    cluster_target: Target, tmp_path: Path
) -> None:
    """client.stop() while on_events waits for a source that is down: the
    waiting batch is abandoned at its next retry (backoff at most 0.5 s
    here), so stop() returns in a few seconds, not after drain_timeout."""
    t = cluster_target
    db = t.deployment.database
    assert db is not None
    proxy = TcpProxy((db.host, db.port))
    config = t.config
    source = PostgresEventSource(proxied_conninfo(t, proxy), connect_timeout=2, writers=PERSISTERS)
    handled: list[str] = []
    client = ReplicationClient(
        reactor,
        config,
        streams={"events"},
        read_only=True,
        checkpoint=FileCheckpointStore(tmp_path / "checkpoint", server_name=config.server_name),
        seed_from=source,
    )
    client.on_events(
        lambda batch: handled.extend(str(e.content.get("body")) for e in batch.events),
        source=source,
        filter=EventFilter(types=["m.room.message"]),
        policy=EventFetchPolicy(unavailable_backoff=ReconnectBackoff(0.2, 0.5)),
    )
    drain = 10.0
    took = None
    try:
        await client.start()
        await with_timeout(client.wait_ready(20), 25, "ready")
        alice = await new_user(t.api, "alice")
        rooms = await rooms_per_writer(t, alice, per_writer=1)
        room = rooms[PERSISTERS[0]][0]
        await alice.message(room, "before")
        await wait_until(lambda: handled == ["before"], timeout=20, what="before")
        proxy.down("refuse")
        await alice.message(room, "during")
        await wait_until(
            lambda: client.counters.event_source_failures >= 2, timeout=20, what="failures"
        )
        stopping = time.monotonic()
        await with_timeout(client.stop(drain_timeout=drain), drain + 20, "stop()")
        took = time.monotonic() - stopping
    finally:
        await stop_client(client)
        source.close()
        proxy.close()
        report(f"cluster: client.stop(drain_timeout={drain}) with the source down took {took}")
    assert took is not None and took < 5, f"stop() took {took:.2f}s"


@pytest.mark.cluster
@pytest_twisted.ensureDeferred
async def test_example_exits_on_sigterm_while_a_database_call_hangs(
    cluster_target: Target, tmp_path: Path, observers: list[Observer]
) -> None:
    """The example's database connection stops answering (a blackhole: open
    connections stay open, nothing gets through) while a message waits for
    its content; SIGTERM must still end the process within the 30 s drain
    and a little more."""
    t = cluster_target
    db = t.deployment.database
    assert db is not None
    proxy = TcpProxy((db.host, db.port))
    observer = Observer(t, tmp_path, ["--database", proxied_conninfo(t, proxy)])
    observers.append(observer)
    try:
        run = observer.spawn()
        alice = await new_user(t.api, "alice")
        rooms = await rooms_per_writer(t, alice, per_writer=1)
        await run.wait_ready()
        room = rooms[PERSISTERS[0]][0]
        await alice.message(room, "before")
        await wait_for_lines(observer, [line(room, alice, "before")])
        proxy.down("blackhole")
        await alice.message(room, "during")
        await sleep(1.0)
        stopping = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        try:
            code = await run.wait_exit(36, dump_threads=True)
        finally:
            report(
                f"cluster: SIGTERM with a hung database call: "
                f"{'exited' if not run.running() else 'still running'} after "
                f"{time.monotonic() - stopping:.1f}s"
            )
        assert code == 0
    finally:
        proxy.close()
