"""Shared helpers for ReplicationClient tests: a homeserver, a client, a row
collector and waiting."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, task

from synrepl.positions import RowsReceived
from synrepl.streams import EventRow
from synrepl.testing.homeserver import FakeHomeserver
from synrepl.twisted.client import ReplicationClient
from synrepl.twisted.http_client import ReplicationHttpClient

_counter = itertools.count()


def unique_server_name() -> str:
    """A server name (so a channel) no other test or process uses."""
    return f"t{os.getpid()}-{next(_counter)}.test"


class Collector:
    """A row handler that records what it was given, in order."""

    def __init__(self) -> None:
        self.batches: list[RowsReceived] = []

    def __call__(self, batch: RowsReceived) -> None:
        self.batches.append(batch)

    def rows(self, stream: str, writer: str) -> list[tuple[int, Any]]:
        """(token, raw row) pairs received for one writer's stream, in order."""
        return [
            (b.token, r.to_raw())
            for b in self.batches
            if b.stream == stream and b.writer == writer
            for r in b.rows
        ]


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` on the reactor until it holds, or fail after ``timeout``."""
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def event(n: int, room: str = "!room:test") -> EventRow:
    """An ``m.room.message`` event row made unique by ``n``."""
    return EventRow(f"$e{n}", room, "m.room.message", None, None, None, None, False, False)


async def homeserver(**kwargs: Any) -> FakeHomeserver:
    """A started FakeHomeserver on the shared Redis, on a channel of its own."""
    hs = FakeHomeserver(reactor, server_name=unique_server_name(), **kwargs)
    await hs.start()
    return hs


def client_for(hs: FakeHomeserver, **kwargs: Any) -> ReplicationClient:
    """A ReplicationClient of ``hs``'s cluster (not started)."""
    config = hs.config()
    return ReplicationClient(
        reactor, config, fetcher=ReplicationHttpClient(reactor, config), **kwargs
    )
