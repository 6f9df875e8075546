"""The asyncio ReplicationHttpClient on its own, with no reactor anywhere.

tests/test_http_client.py runs every client scenario through both clients;
this file pins what only the asyncio client has: its sessions (made on the
loop of the first call, a session given in, one per unix socket), an
``async def`` position waiter, cancellation of a task, and that it runs
under plain ``asyncio.run`` against asyncio servers (aiohttp's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket as sockets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from asyncio_helpers import run_in_new_loop

from synrepl.asyncio.http_client import ReplicationHttpClient
from synrepl.config import SynapseConfig, config_from_dict
from synrepl.http import HttpReplicationError, PositionWaitTimeoutError, RetryPolicy

SECRET = "Asyncio-S3cret"
WRITTEN = {"max_stream_id": 5, "_INT_STREAM_POS": {"account_data": 5, "events": 90}}


@attrs.frozen
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_answer(body: Any, status: int = 200) -> Answer:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status)

    return handle


@contextlib.asynccontextmanager
async def aiohttp_server(
    answer: Answer, *, unix: Path | None = None
) -> AsyncIterator[tuple[list[Seen], int]]:
    """A real aiohttp server on 127.0.0.1 (or a unix socket) that records requests."""
    seen: list[Seen] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        return await answer(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    port = 0
    site: web.BaseSite
    if unix is not None:
        site = web.UnixSite(runner, str(unix))
    else:
        sock = sockets.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield seen, port
    finally:
        await runner.cleanup()


def make_config(port: int, **instance_map: Any) -> SynapseConfig:
    return config_from_dict(
        {
            "server_name": "hs",
            "worker_app": "synapse.app.generic_worker",
            "worker_name": "worker1",
            "worker_replication_secret": SECRET,
            "instance_map": {"main": {"host": "127.0.0.1", "port": port}, **instance_map},
        }
    )


FAST = RetryPolicy(connect_retries=1, connect_base_delay=0.01, timeout_retries=0)


def test_made_outside_a_loop_and_used_on_each_loop_after_close(tmp_path: Path) -> None:
    """Constructing needs no loop; sessions are made at the first call, and
    after close() the next call, on another loop, makes new ones."""
    socket = tmp_path / "main.sock"
    client = ReplicationHttpClient(make_config(1, main={"path": str(socket)}), retry=FAST)

    async def one_call() -> int:
        socket.unlink(missing_ok=True)
        async with aiohttp_server(json_answer({"max_stream_id": 7}), unix=socket) as (seen, _):
            try:
                return await client.remove_tag(user_id="u", room_id="r", tag="t")
            finally:
                await client.close()
                assert len(seen) == 1

    assert run_in_new_loop(one_call()) == 7
    assert run_in_new_loop(one_call()) == 7


def test_an_async_def_waiter_is_awaited() -> None:
    """The waiter may be a coroutine function; the call returns once it has
    finished; ValueError from it means: not followed, not waited for."""

    class Waiter:
        def __init__(self) -> None:
            self.seen = asyncio.Event()
            self.finished: list[str] = []

        async def wait_for_stream_position(self, stream: str, writer: str, token: int) -> None:
            if stream == "events":
                raise ValueError("not following events")
            await self.seen.wait()
            self.finished.append(stream)

    async def main() -> None:
        waiter = Waiter()
        async with aiohttp_server(json_answer(WRITTEN)) as (_, port):
            client = ReplicationHttpClient(make_config(port), position_waiter=waiter)
            call = asyncio.ensure_future(
                client.add_user_account_data(user_id="@u:hs", account_data_type="m.x", content={})
            )
            await asyncio.sleep(0.2)
            assert not call.done(), "returned before the position was seen"
            waiter.seen.set()
            assert await call == 5
            assert waiter.finished == ["account_data"]
            await client.close()

    run_in_new_loop(main())


def test_position_waits_are_cancelled_on_timeout() -> None:
    futures: list[asyncio.Future[None]] = []

    class NeverSees:
        def wait_for_stream_position(
            self, stream: str, writer: str, token: int
        ) -> asyncio.Future[None]:
            futures.append(asyncio.get_running_loop().create_future())
            return futures[-1]

    async def main() -> PositionWaitTimeoutError:
        async with aiohttp_server(json_answer(WRITTEN)) as (seen, port):
            client = ReplicationHttpClient(
                make_config(port), position_waiter=NeverSees(), position_wait_timeout=0.1
            )
            try:
                with pytest.raises(PositionWaitTimeoutError) as info:
                    await client.add_user_account_data(
                        user_id="@u:hs", account_data_type="m.x", content={}
                    )
            finally:
                await client.close()
            await asyncio.sleep(0)
            assert len(seen) == 1
            return info.value

    error = run_in_new_loop(main())
    assert error.pending == {"account_data": 5, "events": 90}
    assert len(futures) == 2 and all(f.cancelled() for f in futures)


def test_a_given_session_serves_tcp_and_stays_open(tmp_path: Path) -> None:
    """``session=`` carries the TCP calls (here: counted by its trace config)
    and is not closed by close(); a unix-socket instance has its own."""

    async def main() -> None:
        started: list[str] = []

        async def on_start(session: Any, context: Any, params: Any) -> None:
            started.append(str(params.url))

        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(on_start)
        socket = tmp_path / "r.sock"
        async with (
            aiohttp.ClientSession(trace_configs=[trace]) as session,
            aiohttp_server(json_answer({})) as (tcp, port),
            aiohttp_server(json_answer({}), unix=socket) as (unix, _),
        ):
            config = make_config(port, sock={"path": str(socket)})
            client = ReplicationHttpClient(config, session=session)
            await client.handle_new_device_update()
            await client.post_register(
                user_id="@u:hs", auth_result={}, access_token=None, instance="sock"
            )
            await client.close()
            assert not session.closed
            assert started == [
                f"http://127.0.0.1:{port}/_synapse/replication/handle_new_device_update/"
            ]
            assert [s.raw_path for s in tcp] == ["/_synapse/replication/handle_new_device_update/"]
            (request,) = unix
            assert request.raw_path.startswith("/_synapse/replication/post_register/%40u%3Ahs/")
            assert request.headers["Host"] == "localhost"
            assert request.headers["Authorization"] == f"Bearer {SECRET}"

    run_in_new_loop(main())


def test_cancelling_the_task_stops_the_call() -> None:
    async def main() -> int:
        release = asyncio.Event()

        async def hang(request: web.Request) -> web.StreamResponse:
            await release.wait()
            return web.json_response({})

        async with aiohttp_server(hang) as (seen, port):
            client = ReplicationHttpClient(make_config(port), timeout=5)
            call = asyncio.ensure_future(client.fed_cleanup_room(room_id="!r:hs"))
            await asyncio.sleep(0.1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.sleep(0.1)
            release.set()
            await client.close()
            return len(seen)

    assert run_in_new_loop(main()) == 1, "no retry after a cancellation"


def test_no_cookies_and_no_redirects(tmp_path: Path) -> None:
    """Like Twisted's Agent: a Set-Cookie is not sent back and a redirect is
    not followed (a 3xx is an error answer, as any non-2xx)."""
    socket = tmp_path / "main.sock"  # a host name (localhost), where cookies would stick

    async def main() -> list[Seen]:
        async def cookie_then_redirect(request: web.Request) -> web.StreamResponse:
            if request.path.endswith("/handle_new_device_update/"):
                response = web.json_response({})
                response.set_cookie("session", "abc")
                return response
            raise web.HTTPFound("/elsewhere")

        async with aiohttp_server(cookie_then_redirect, unix=socket) as (seen, _):
            client = ReplicationHttpClient(make_config(1, main={"path": str(socket)}))
            await client.handle_new_device_update()
            with pytest.raises(HttpReplicationError, match="HTTP 302"):
                await client.call("remove_tag", "main", user_id="u", room_id="r", tag="t")
            await client.close()
            return seen

    seen = run_in_new_loop(main())
    assert len(seen) == 2
    assert "Cookie" not in seen[1].headers
