"""A rolling upgrade: a main process of one release, a worker of the previous.

The cluster is ``conftest.cluster``'s shape on its own database and Redis,
with ``persister2`` (an event persister) and ``writer1`` (to_device,
account data, receipts, presence) running the previous Synapse release
(``SYNREPL_SYNAPSE_PREVIOUS_PYTHON``: ``tests/interop/matrix.py`` builds it)
while the main process and the rest run the release under test.  A synrepl
client follows every stream while messages go to rooms on both persisters;
then ``persister2`` is upgraded (stopped, started on the main's release)
while messages keep coming.  Every event arrives once, from its persister,
and everything on the wire is delivered; ``synrepl doctor`` names each
instance's release.

Without ``SYNREPL_SYNAPSE_PREVIOUS_PYTHON`` the module is skipped, except
under ``CI``, where that is a failure: CI must run it.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from harness import (
    MIXED_PREVIOUS,
    Deployment,
    installed_synapse_version,
    release_facts,
    synapse_python,
    wait_for_subscribers,
)
from matrix_api import Api, cluster_route
from redis_server import RedisServer
from repl import Observation
from test_cluster import (
    WRITERS,
    assert_every_event_once,
    new_user,
    rooms_on_each_persister,
)
from twisted.internet import threads

from synrepl.config import load_config
from synrepl.releases import SynapseRelease, facts_for, release_in_server_header

pytestmark = pytest.mark.cluster


@pytest_twisted.async_yield_fixture
async def mixed_api(mixed: Deployment) -> AsyncIterator[Api]:
    client = Api(cluster_route(mixed.client_urls))
    yield client
    await client.close()


def served_release(port: int) -> SynapseRelease | None:
    """The release an instance names in its ``Server`` header (Synapse run
    from inside a git checkout appends the branch, as in CI's clone)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
        return release_in_server_header(answer.headers["Server"])


def instance_port(deployment: Deployment, name: str) -> int:
    return deployment.processes[name].health_port


@pytest_twisted.ensureDeferred
async def test_rolling_upgrade_loses_nothing(
    mixed: Deployment, mixed_redis: RedisServer, mixed_api: Api, previous_python: str
) -> None:
    previous = installed_synapse_version(previous_python)
    current = installed_synapse_version()
    assert SynapseRelease.parse(previous) < SynapseRelease.parse(current)
    for name in mixed.processes:
        expected = previous if name in MIXED_PREVIOUS else current
        assert served_release(instance_port(mixed, name)) == SynapseRelease.parse(expected), name

    # Only the streams both releases have: a stream new in the main's
    # release has no writer on the old workers yet.
    both = release_facts().streams & facts_for(SynapseRelease.parse(previous)).streams
    expect = {s: w for s, w in WRITERS.items() if s in both}
    obs = Observation(load_config(mixed.shared_config), mixed_redis.port)
    await obs.start(expect)
    try:
        alice, bob = await new_user(mixed_api, "alice"), await new_user(mixed_api, "bob")
        rooms = await rooms_on_each_persister(alice, obs.config, per_persister=2)
        every_room = [room for listed in rooms.values() for room in listed]
        for room in every_room:
            await bob.join(room)
            for n in range(3):
                await alice.message(room, f"before the upgrade {n}")
                await bob.message(room, f"reply {n}")

        upgraded = mixed.processes["persister2"]
        subscribed = len(mixed.processes)
        upgraded.stop()
        upgraded.python = synapse_python()
        await threads.deferToThread(upgraded.start)
        await threads.deferToThread(
            wait_for_subscribers, mixed.redis_port, mixed.server_name, subscribed
        )
        assert served_release(upgraded.health_port) == SynapseRelease.parse(current)
        for room in every_room:
            for n in range(3):
                await alice.message(room, f"after the upgrade {n}")

        await assert_every_event_once(obs.rec, alice, rooms)
        assert obs.rec.gaps == []
        obs.rec.assert_in_order_once()
        await obs.assert_matches_wire()
    finally:
        await obs.stop()


def test_doctor_names_each_instance_release(mixed: Deployment, previous_python: str) -> None:
    """``synrepl doctor`` on the mixed cluster names both releases, instance
    by instance, and warns that they differ."""
    previous = installed_synapse_version(previous_python)
    current = installed_synapse_version()
    doctor = ["doctor", "--color", "never", "--listen", "1", "-c", str(mixed.shared_config)]
    ran = subprocess.run(
        [sys.executable, "-m", "synrepl", *doctor],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    lines = ran.stdout.splitlines()
    for name, process in mixed.processes.items():
        key = "main" if name == "master" else name
        release = installed_synapse_version(process.python)
        assert any(f"{key} runs Synapse {release}" in line for line in lines), (name, ran.stdout)
    assert any("instances run different Synapse versions" in line for line in lines), ran.stdout
    assert previous != current
