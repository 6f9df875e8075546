"""Fixtures of the interop suite: real Redis, real Synapse, torn down whatever happens.

Two deployments, each started once per run (session scope) and shared by
the tests that need it:

- ``main_only``: one Synapse main process on SQLite, with its own
  ``redis-server`` on a free port;
- ``cluster``: a Synapse main process and four generic workers (two event
  persisters, a typing writer, a to_device/account_data/receipts/presence
  writer) on a fresh PostgreSQL database, with their own ``redis-server``.

Start-up waits on ``GET /health`` of every process, never on sleeps.  Logs
are kept in the run's directory (``SYNREPL_INTEROP_LOGS=<dir>`` to choose
it; otherwise pytest's temporary directory, where the last three runs are
kept) and the tail of every live process's log is added to the report of a
failing test.  Start-up and total times are printed at the end of the run.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import asyncioreactor

# The suite runs on Twisted's asyncio reactor (pytest.ini: --reactor=asyncio),
# so that the asyncio ReplicationClient runs beside the Twisted one; the
# modules imported below import the reactor, so it is installed first.
if "twisted.internet.reactor" not in sys.modules:
    asyncioreactor.install()

# The unit suite's helpers (RedisServer, wait_until) live one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness
import pytest_twisted
from matrix_api import Api, main_only_route
from redis_server import RedisServer, redis_server_available
from repl import Observation, every

from synrepl.config import load_config
from synrepl.releases import NEWEST, OLDEST_KNOWN, ReleaseFacts

TIMINGS: dict[str, float] = {}
_SESSION_START = time.monotonic()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.interop)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proc in list(harness.LIVE.values()):
            report.sections.append(
                (f"Synapse {proc.name} ({proc.directory.name})", proc.log_tail())
            )
        for server in list(_REDIS.values()):
            report.sections.append((f"redis {server.port}", server.log()))


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not TIMINGS:
        return
    terminalreporter.section("interop timings")
    for name, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{name:40} {seconds:7.2f} s")
    terminalreporter.write_line(f"{'whole session':40} {time.monotonic() - _SESSION_START:7.2f} s")


_REDIS: dict[str, RedisServer] = {}


@pytest.fixture(scope="session")
def interop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("SYNREPL_INTEROP_LOGS")
    if chosen:
        path = Path(chosen) / time.strftime("run-%Y%m%d-%H%M%S")
        path.mkdir(parents=True)
        return path
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="session", autouse=True)
def _check_versions() -> None:
    version = harness.installed_synapse_version()
    if not harness.release_facts().known:
        pytest.exit(
            f"Synapse {version} (from {harness.synapse_python()}) is outside the releases "
            f"synrepl knows ({OLDEST_KNOWN} to {NEWEST})",
            returncode=2,
        )
    if not redis_server_available():
        pytest.exit("the interop suite needs a redis-server executable on PATH", returncode=2)


@pytest.fixture(scope="session")
def release_facts() -> ReleaseFacts:
    """What the Synapse release under test (the one ``SYNREPL_SYNAPSE_PYTHON``
    runs) has on the wire, from synrepl.releases."""
    return harness.release_facts()


def _redis(directory: Path, name: str) -> Iterator[RedisServer]:
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    _REDIS[name] = server
    try:
        yield server
    finally:
        _REDIS.pop(name, None)
        server.close()


@pytest.fixture(scope="session")
def main_redis(interop_dir: Path) -> Iterator[RedisServer]:
    yield from _redis(interop_dir / "main-redis", "main")


@pytest.fixture(scope="session")
def cluster_redis(interop_dir: Path) -> Iterator[RedisServer]:
    yield from _redis(interop_dir / "cluster-redis", "cluster")


def _start_timed(deployment: harness.Deployment, label: str, total: str) -> None:
    """Start a deployment, recording its start-up times for the summary."""
    started = time.monotonic()
    took = deployment.start()
    TIMINGS[total] = time.monotonic() - started
    for name, seconds in took.items():
        TIMINGS[f"{label}:   {name} after"] = seconds


@pytest.fixture(scope="session")
def main_only(interop_dir: Path, main_redis: RedisServer) -> Iterator[harness.Deployment]:
    """One Synapse main process (SQLite) on free ports, with Redis."""
    directory = interop_dir / "main-only"
    directory.mkdir()
    deployment = harness.main_only(directory, main_redis.port)
    try:
        _start_timed(deployment, "main-only", "main-only: start")
        yield deployment
    finally:
        deployment.stop()


def _cluster(
    directory: Path, redis_port: int, label: str, **options: Any
) -> Iterator[harness.Deployment]:
    """A cluster (``harness.cluster``) on a fresh PostgreSQL database, started,
    then stopped and its database dropped whatever happens."""
    directory.mkdir()
    database = harness.PostgresDatabase()
    database.create()
    try:
        deployment = harness.cluster(directory, redis_port, database, **options)
        try:
            _start_timed(deployment, label, f"{label}: start (5 processes)")
            yield deployment
        finally:
            deployment.stop()
    finally:
        database.drop()


@pytest.fixture(scope="session")
def cluster(interop_dir: Path, cluster_redis: RedisServer) -> Iterator[harness.Deployment]:
    """Main + two event persisters + typing writer + to_device/account_data/
    receipts/presence writer, on a fresh PostgreSQL database, with Redis."""
    yield from _cluster(interop_dir / "cluster", cluster_redis.port, "cluster")


@pytest.fixture(scope="module")
def previous_python() -> str:
    """The interpreter of the release before the one under test
    (``SYNREPL_SYNAPSE_PREVIOUS_PYTHON``); without it the tests that need it
    are skipped, except under ``CI``, where they must run."""
    python = os.environ.get("SYNREPL_SYNAPSE_PREVIOUS_PYTHON")
    if not python:
        why = "SYNREPL_SYNAPSE_PREVIOUS_PYTHON names no environment of the previous release"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return python


@pytest.fixture(scope="module")
def mixed_redis(interop_dir: Path) -> Iterator[RedisServer]:
    yield from _redis(interop_dir / "mixed-redis", "mixed")


@pytest.fixture(scope="module")
def mixed(
    interop_dir: Path, mixed_redis: RedisServer, previous_python: str
) -> Iterator[harness.Deployment]:
    """The cluster, with ``harness.MIXED_PREVIOUS`` on the previous release (a
    rolling upgrade under way), on its own database and Redis."""
    yield from _cluster(
        interop_dir / "mixed",
        mixed_redis.port,
        "mixed",
        server_name="mixed.interop.test",
        pythons={name: previous_python for name in harness.MIXED_PREVIOUS},
    )


# The main-only deployment's client-API client and synrepl observer, shared
# by the test modules that use it (test_cluster.py overrides both for the
# cluster).


@pytest_twisted.async_yield_fixture
async def api(main_only: harness.Deployment) -> AsyncIterator[Api]:
    client = Api(main_only_route(main_only.client_urls))
    yield client
    await client.close()


@pytest.fixture(params=("twisted", "asyncio"))
def adapter(request: pytest.FixtureRequest) -> str:
    """Each ReplicationClient adapter in turn: the client scenarios run for both."""
    return str(request.param)


@pytest_twisted.async_yield_fixture
async def obs(
    main_only: harness.Deployment, main_redis: RedisServer, adapter: str
) -> AsyncIterator[Observation]:
    """A synrepl client (of each adapter) following every stream of the main
    process, and a tap."""
    observation = Observation(
        load_config(*main_only.config_files["master"]), main_redis.port, adapter=adapter
    )
    await observation.start(every(harness.release_facts().streams, {"master"}))
    try:
        yield observation
    finally:
        await observation.stop()
