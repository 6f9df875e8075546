"""pytest fixtures for testing a worker on synrepl, without Redis or Synapse.

Installed with synrepl as the pytest plugin ``synrepl`` (entry point
``pytest11``), so the fixtures need no import:

- ``synrepl_time``: a :class:`~synrepl.testing.clock.VirtualTime`, the clock
  and in-memory Redis everything else runs on; ``synrepl_time.run(coro)``
  drives a coroutine to its end (inside ``@given`` too).
- ``synrepl_homeserver``: a started
  :class:`~synrepl.testing.homeserver.FakeHomeserver` on it (writers
  ``master`` and ``persister1`` unless ``@pytest.mark.synrepl(writers=...)``
  says otherwise; the marker's other keywords go to ``FakeHomeserver``).
- ``synrepl_client``: a Twisted ``ReplicationClient`` of that homeserver,
  started and ready (every writer's POSITION heard), so every row written
  from the test's first line on reaches the handlers the test adds.
- ``synrepl_published``: what ``synrepl_client`` published, as
  ``(channel, line)`` pairs, in order.

Everything is stopped after the test.  Nothing here imports the reactor, so
the plugin does not fight pytest-twisted over which one is installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from synrepl.testing.clock import VirtualTime
    from synrepl.testing.homeserver import FakeHomeserver
    from synrepl.twisted.client import ReplicationClient

__all__ = (
    "synrepl_time",
    "synrepl_homeserver",
    "synrepl_client",
    "synrepl_published",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "synrepl(writers=..., **homeserver_options): the synrepl_homeserver fixture's writers "
        "and FakeHomeserver options",
    )


@pytest.fixture
def synrepl_time() -> VirtualTime:
    """Virtual time with Redis in memory."""
    from synrepl.testing.clock import VirtualTime

    return VirtualTime()


@pytest.fixture
def synrepl_homeserver(
    request: pytest.FixtureRequest, synrepl_time: VirtualTime
) -> Iterator[FakeHomeserver]:
    """A started simulated homeserver on ``synrepl_time``."""
    marker = request.node.get_closest_marker("synrepl")
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    options.setdefault("writers", ("master", "persister1"))
    hs = synrepl_time.run(synrepl_time.homeserver(**options))
    yield hs
    synrepl_time.run(hs.stop())


@pytest.fixture
def synrepl_client(
    synrepl_time: VirtualTime, synrepl_homeserver: FakeHomeserver
) -> Iterator[ReplicationClient]:
    """A started, ready ``ReplicationClient`` of ``synrepl_homeserver``."""
    client = synrepl_time.client(synrepl_homeserver, instance_name="worker-under-test")
    synrepl_time.run(_started(client))
    yield client
    synrepl_time.run(_stopped(client))


@pytest.fixture
def synrepl_published(
    synrepl_time: VirtualTime, synrepl_client: ReplicationClient
) -> list[tuple[str, str]]:
    """The lines ``synrepl_client`` published (a live list: it grows)."""
    from synrepl.testing.memory import MemoryTransport

    transport = synrepl_client.transport
    assert isinstance(transport, MemoryTransport)
    return transport.published


async def _started(client: ReplicationClient) -> None:
    await client.start()
    await client.wait_ready(timeout=30)


async def _stopped(client: ReplicationClient) -> None:
    await client.stop()
