"""The sinks' servers for ``test_export.py``: nats-server with JetStream, a
redis-server that keeps its data across a restart, and a webhook receiver.

- :class:`NatsServer` and :func:`nats_server_available`: the unit suite's
  (``tests/nats_server.py``), re-exported.
- :class:`DurableRedisServer`: :class:`~redis_server.RedisServer` with an
  append-only file fsynced on every write, so a stream key survives
  :meth:`DurableRedisServer.stop` (SIGTERM) and a restart.
- :class:`WebhookReceiver`: a real ``aiohttp.web`` server in the test
  process (on the reactor's asyncio loop), checking the
  ``X-Synrepl-Signature`` of every request it is sent and keeping each
  batch's messages in the order received.

Everything blocking here runs at fixture set-up or between steps of a
test (a few milliseconds); the receiver's coroutines are awaited through
:func:`aio`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Coroutine
from typing import Any

import attrs
from nats_server import NatsServer, nats_server_available
from redis_server import RedisServer, free_port
from twisted.internet import defer

from synrepl.export.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature

__all__ = (
    "NatsServer",
    "DurableRedisServer",
    "WebhookReceiver",
    "Request",
    "aio",
    "nats_server_available",
)


def aio(coroutine: Coroutine[Any, Any, Any]) -> defer.Deferred[Any]:
    """An asyncio coroutine as a Deferred (the suite runs on Twisted's asyncio reactor)."""
    return defer.Deferred.fromFuture(asyncio.ensure_future(coroutine))


class DurableRedisServer(RedisServer):
    """A redis-server whose data survives a stop: AOF, ``appendfsync always``."""

    def _args(self) -> list[str]:
        args = super()._args()
        at = args.index("--appendonly")
        args[at + 1] = "yes"
        return [*args, "--appendfsync", "always"]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: Redis fsyncs its append-only file and exits."""
        for client in self._clients:
            client.close()
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@attrs.define
class Request:
    """One POST the receiver was sent."""

    headers: dict[str, str]
    body: bytes
    #: None when the signature checked out, else why not.
    bad_signature: str | None
    messages: list[dict[str, Any]]


class WebhookReceiver:
    """An aiohttp server on a free loopback port, answering 200 to each
    well-signed batch (401 to any other) and keeping what it was sent."""

    def __init__(self, secret: bytes, path: str = "/hook") -> None:
        self.secret = secret
        self.path = path
        self.port = free_port()
        self.requests: list[Request] = []
        self._runner: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    def messages(self) -> list[dict[str, Any]]:
        """Every message of every batch accepted, in the order received."""
        return [m for r in self.requests if r.bad_signature is None for m in r.messages]

    def bad_requests(self) -> list[Request]:
        return [r for r in self.requests if r.bad_signature is not None]

    def check(self, headers: Any, body: bytes) -> str | None:
        timestamp = headers.get(TIMESTAMP_HEADER)
        given = headers.get(SIGNATURE_HEADER)
        if timestamp is None or given is None:
            return "unsigned"
        if abs(time.time() - int(timestamp)) > 300:
            return f"old timestamp {timestamp}"
        if given != signature(self.secret, timestamp, body):
            return f"signature {given} does not match"
        return None

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        bad = self.check(request.headers, body)
        messages: list[dict[str, Any]] = []
        if bad is None:
            try:
                messages = list(json.loads(body)["messages"])
            except (ValueError, KeyError, TypeError) as e:
                bad = f"not a batch: {e}"
        self.requests.append(Request(dict(request.headers), body, bad, messages))
        if bad is not None:
            return web.Response(status=401, text=bad)
        return web.json_response({"ok": True})

    async def start(self) -> None:
        """Listen (again, on the same port after :meth:`stop`)."""
        from aiohttp import web

        app = web.Application()
        app.router.add_post(self.path, self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening and drop the open connections."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            with contextlib.suppress(Exception):
                await runner.cleanup()
