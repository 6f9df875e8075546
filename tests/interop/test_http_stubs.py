"""synrepl's HTTP replication stubs against a real Synapse main process (scenario 5).

- ``get_repl_stream_updates`` pages through more rows than Synapse puts in
  one answer, and the pages together are exactly the rows published live;
- ``presence_set_state`` changes what the client API reports;
- ``add_user_account_data`` and ``add_tag`` return only once the
  ``account_data`` row they caused has been delivered by the
  ``ReplicationClient`` (read-after-write through ``_INT_STREAM_POS``);
- a wrong ``worker_replication_secret`` is one request, one clear error.

Each runs through both clients: :mod:`synrepl.twisted.http_client` and
:mod:`synrepl.asyncio.http_client`. The suite runs on the Twisted reactor,
so each asyncio call runs in ``asyncio.run`` on a worker thread, with a
client of its own (its sessions belong to that loop), and its position
waiter is the suite's Twisted ``ReplicationClient``, reached through the
reactor thread (:class:`ReactorWaiter`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import attrs
import pytest
import pytest_twisted
from harness import Deployment
from matrix_api import Api, User
from repl import Observation
from twisted.internet import reactor, threads
from twisted.python.failure import Failure
from twisted.web.client import Agent

from synrepl.asyncio.http_client import ReplicationHttpClient as AsyncioHttpClient
from synrepl.config import Secret, SynapseConfig, load_config
from synrepl.http import HttpReplicationError, RetryPolicy, StreamUpdates
from synrepl.streams import AccountDataRow, PresenceRow, parse_row
from synrepl.twisted.http_client import ReplicationHttpClient

pytestmark = pytest.mark.main_only

_T = TypeVar("_T")

#: One call on a client: ``lambda http: http.add_tag(...)``.
Call = Callable[[Any], Awaitable[_T]]

CLIENTS = ["twisted", "asyncio"]


class ViaTwisted:
    """Calls through a Twisted client, on the reactor."""

    def __init__(self, http: ReplicationHttpClient) -> None:
        self.http = http

    async def __call__(self, call: Call[_T]) -> _T:
        return await call(self.http)


class ReactorWaiter:
    """A Twisted position waiter (the suite's ReplicationClient) seen from an
    asyncio loop on another thread: its waits start on the reactor thread and
    settle asyncio futures; a cancelled future cancels the Deferred."""

    def __init__(self, waiter: Any) -> None:
        self.waiter = waiter

    def wait_for_stream_position(self, stream: str, writer: str, token: int) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        started: list[Any] = []

        def settle(error: BaseException | None) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        def to_loop(error: BaseException | None) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, error)

        def start() -> None:
            try:
                wait = self.waiter.wait_for_stream_position(stream, writer, token)
            except ValueError as e:
                to_loop(e)
                return
            started.append(wait)

            def failed(failure: Failure) -> None:
                to_loop(failure.value)

            wait.addCallbacks(lambda _: to_loop(None), failed)

        def cancel_on_reactor(done: asyncio.Future[None]) -> None:
            if done.cancelled():
                reactor.callFromThread(lambda: [wait.cancel() for wait in started])

        future.add_done_callback(cancel_on_reactor)
        reactor.callFromThread(start)
        return future


class ViaAsyncio:
    """Calls through an asyncio client: each in ``asyncio.run`` on a worker
    thread, with a client of its own, closed after the call.

    ``count_requests`` hands the client an ``aiohttp.ClientSession`` whose
    trace config records every request made, in :attr:`requests`.
    """

    def __init__(
        self,
        config: SynapseConfig,
        *,
        waiter: Any = None,
        count_requests: bool = False,
        **options: Any,
    ) -> None:
        self.config = config
        self.waiter = waiter
        self.count_requests = count_requests
        self.options = options
        self.requests: list[str] = []

    async def __call__(self, call: Call[_T]) -> _T:
        result: _T = await threads.deferToThread(asyncio.run, self._run(call))
        return result

    async def _run(self, call: Call[_T]) -> _T:
        options = dict(self.options)
        if self.waiter is not None:
            options["position_waiter"] = ReactorWaiter(self.waiter)
        session = None
        if self.count_requests:

            async def started(session: Any, context: Any, params: Any) -> None:
                self.requests.append(str(params.url))

            trace = aiohttp.TraceConfig()
            trace.on_request_start.append(started)
            session = options["session"] = aiohttp.ClientSession(trace_configs=[trace])
        http = AsyncioHttpClient(self.config, **options)
        try:
            return await call(http)
        finally:
            await http.close()
            if session is not None:
                await session.close()


async def new_user(api: Api, name: str) -> User:
    return await api.register(f"{name}{time.time_ns() % 10**12}")


async def fetch_pages(http: Any, start: int, end: int) -> list[StreamUpdates]:
    """Every page from ``start`` to ``end``, following ``limited``."""
    pages = []
    token = start
    while True:
        page: StreamUpdates = await http.get_repl_stream_updates(
            "master", "account_data", token, end
        )
        pages.append(page)
        if not page.limited:
            return pages
        token = page.upto_token


def via(which: str, obs: Observation) -> ViaTwisted | ViaAsyncio:
    """The suite's own Twisted client (``client.http``), or an asyncio one
    with the same configuration, instance name and position waiter."""
    client = obs.client
    assert client is not None and client.http is not None
    if which == "twisted":
        return ViaTwisted(client.http)
    return ViaAsyncio(obs.config, waiter=client, instance_name=client.instance_name)


@pytest.mark.parametrize("which", CLIENTS)
@pytest_twisted.ensureDeferred
async def test_get_repl_stream_updates_pages_through_a_long_range(
    api: Api, obs: Observation, which: str
) -> None:
    """250 account_data rows are more than one page (Synapse answers at most
    100 rows): synrepl follows ``limited`` from ``upto_token`` and the pages
    together are, token for token, the rows published over Redis."""
    client = obs.client
    assert client is not None
    alice = await new_user(api, "pager")
    start = client.positions()["account_data"]["master"]
    for n in range(250):
        await alice.set_account_data(f"org.example.page.{n}", {"n": n})
    rows = await obs.rec.wait_for(
        "250 account_data rows",
        "account_data",
        where=lambda r: r.user_id == alice.user_id,
        count=250,
    )
    end = client.positions()["account_data"]["master"]
    live = [
        (t, r)
        for (s, _, t), rs in sorted(obs.rec.keyed().items())
        if s == "account_data" and start < t <= end
        for r in rs
    ]
    assert len(live) >= len(rows) == 250

    pages = await via(which, obs)(lambda http: fetch_pages(http, start, end))
    assert pages[-1].upto_token == end
    assert all(start < p.upto_token < end for p in pages[:-1])
    assert len(pages) >= 3 and all(p.limited for p in pages[:-1])
    assert all(len(p.updates) <= 100 for p in pages)
    fetched = [(t, r) for p in pages for t, r in p.updates]
    assert fetched == live
    assert all(parse_row("account_data", r) == AccountDataRow.from_raw(r) for _, r in fetched)
    await obs.assert_matches_wire()


@pytest.mark.parametrize("which", CLIENTS)
@pytest_twisted.ensureDeferred
async def test_presence_set_state(api: Api, obs: Observation, which: str) -> None:
    """``presence_set_state`` on the main process: the client API then
    reports that state, and the presence row is on replication."""
    alice = await new_user(api, "presence")
    await via(which, obs)(
        lambda http: http.presence_set_state(
            user_id=alice.user_id,
            device_id=alice.device_id,
            state={"presence": "unavailable", "status_msg": "set over replication"},
        )
    )
    (row,) = await obs.rec.wait_for(
        "the presence row",
        "presence",
        where=lambda r: r.user_id == alice.user_id and r.state == "unavailable",
    )
    assert isinstance(row, PresenceRow) and row.status_msg == "set over replication"
    seen = await alice.presence_of(alice.user_id)
    assert (seen["presence"], seen["status_msg"]) == ("unavailable", "set over replication")
    await obs.assert_matches_wire()


# "client.http" pins a bug this suite found: the client's own HTTP client
# once took the config's instance name ("master" for a homeserver.yaml), so
# answers from the main process looked like its own writes and read-after-
# write was skipped.
@pytest.mark.parametrize("which", ["client.http", "explicit", "asyncio"])
@pytest_twisted.ensureDeferred
async def test_account_data_stubs_return_after_the_row_is_seen(
    api: Api, obs: Observation, which: str
) -> None:
    """``add_user_account_data`` and ``add_tag`` answer with the writer's
    ``account_data`` position; by the time the stub returns, synrepl's
    handlers have already been given the row at that position.

    ``client.http`` is the HTTP client the ReplicationClient made itself;
    ``explicit`` is one made by hand with the ReplicationClient as its
    position waiter and the client's instance name; ``asyncio`` is the
    asyncio client, made the same way."""
    client = obs.client
    assert client is not None
    http: ReplicationHttpClient | None = None
    calls: ViaTwisted | ViaAsyncio
    if which == "client.http":
        assert client.http is not None
        calls = ViaTwisted(client.http)
    elif which == "explicit":
        http = ReplicationHttpClient(
            reactor, obs.config, position_waiter=client, instance_name=client.instance_name
        )
        calls = ViaTwisted(http)
    else:
        calls = via("asyncio", obs)
    # Spy on the waits, so that the check does not depend on whether Redis
    # or the HTTP answer happens to arrive first.
    # The asyncio client's own HTTP client waits on the client itself, not
    # on the test's facade around it.
    waited = getattr(client, "wrapped", client)
    waits: list[tuple[str, str, int]] = []
    original = waited.wait_for_stream_position

    def spy(stream: str, writer: str, token: int) -> Any:
        waits.append((stream, writer, token))
        return original(stream, writer, token)

    waited.wait_for_stream_position = spy
    try:
        ids = await _stubs_wait_for_their_rows(api, obs, calls)
        assert [w for w in waits if w[0] == "account_data"] == [
            ("account_data", "master", i) for i in ids
        ]
    finally:
        del waited.wait_for_stream_position
        if http is not None:
            await http.close()


async def _stubs_wait_for_their_rows(
    api: Api, obs: Observation, calls: ViaTwisted | ViaAsyncio
) -> tuple[int, int]:
    alice = await new_user(api, "writer")
    room = await alice.create_room()
    rec = obs.rec

    def rows_now(data_type: str) -> list[tuple[int, Any]]:
        return [
            (b.token, r)
            for b in rec.batches
            for r in b.rows
            if b.stream == "account_data"
            and r.user_id == alice.user_id
            and r.data_type == data_type
        ]

    stream_id: int = await calls(
        lambda http: http.add_user_account_data(
            user_id=alice.user_id, account_data_type="org.example.stub", content={"via": "synrepl"}
        )
    )
    # No waiting here: the row must already be there.
    assert rows_now("org.example.stub") == [
        (stream_id, AccountDataRow(alice.user_id, None, "org.example.stub"))
    ]
    assert await alice.get_account_data("org.example.stub") == {"via": "synrepl"}

    tag_id: int = await calls(
        lambda http: http.add_tag(
            user_id=alice.user_id, room_id=room, tag="u.synrepl", content={"order": 0.5}
        )
    )
    assert tag_id > stream_id
    assert rows_now("m.tag") == [(tag_id, AccountDataRow(alice.user_id, room, "m.tag"))]
    assert await alice.tags(room) == {"u.synrepl": {"order": 0.5}}
    await obs.assert_matches_wire()
    return stream_id, tag_id


@attrs.define
class CountingAgent:
    """An Agent that counts the requests it makes."""

    agent: Any
    requests: list[bytes] = attrs.Factory(list)

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None):  # type: ignore[no-untyped-def]
        self.requests.append(uri)
        return self.agent.request(method, uri, headers, bodyProducer)


@pytest.mark.parametrize("which", CLIENTS)
@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_one_request_and_a_clear_error(
    api: Api, main_only: Deployment, which: str
) -> None:
    """Synapse 1.163.2 answers a wrong replication secret with a 500; synrepl
    does not retry an error answer and says what the likely cause is."""
    config = load_config(*main_only.config_files["master"])
    wrong = attrs.evolve(config, worker_replication_secret=Secret("not-the-secret"))
    calls: ViaTwisted | ViaAsyncio
    if which == "twisted":
        agent = CountingAgent(Agent(reactor))
        calls = ViaTwisted(ReplicationHttpClient(reactor, wrong, agent=agent, retry=RetryPolicy()))
        requests: list[Any] = agent.requests
    else:
        calls = ViaAsyncio(wrong, retry=RetryPolicy(), count_requests=True)
        requests = calls.requests
    alice = await new_user(api, "secret")
    with pytest.raises(HttpReplicationError) as raised:
        await calls(
            lambda http: http.add_user_account_data(
                user_id=alice.user_id, account_data_type="org.example.never", content={}
            )
        )
    error = raised.value
    assert error.status == 500
    assert "worker_replication_secret" in str(error)
    assert "not-the-secret" not in str(error) and "not-the-secret" not in repr(error)
    assert len(requests) == 1
    # Nothing was written.
    with pytest.raises(AssertionError, match="404"):
        await alice.get_account_data("org.example.never")
    # And get_repl_stream_updates fails the same way, once.
    with pytest.raises(HttpReplicationError):
        await calls(lambda http: http.get_repl_stream_updates("master", "account_data", 0, 1))
    assert len(requests) == 2
