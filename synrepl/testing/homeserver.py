"""A simulated homeserver: stream writers on a real Redis, without Synapse.

For synrepl's tests, and for users who want to test their own worker against
realistic replication traffic without running Synapse.  Each simulated
writer instance:

- publishes RDATA on ``<server_name>`` with Synapse's semantics: rows sharing
  a token go out as ``batch`` rows completed by one numeric-token row;
  tokens of a stream are one sequence shared by all its writers (like
  Synapse's multi-writer id generators), increasing per writer;
- answers ``REPLICATE`` with ``POSITION <stream> <writer> <last> <last>`` for
  every stream it writes (those its configuration gives it, and
  ``caches``), written or not, as Synapse does (a fresh one with ``0 0``);
- keeps its history and serves ``get_repl_stream_updates`` over HTTP on its
  own port, in pages of ``page_limit`` rows, checking the replication secret
  the way Synapse does (a wrong or missing secret gets a 500);
- can drop, duplicate or reorder its next messages on request, to test what
  a consumer does with a lossy wire.

Usage (inside a Twisted test)::

    hs = FakeHomeserver(reactor, writers=("master", "persister1"))
    await hs.start()
    config = hs.config()          # a SynapseConfig pointing at it
    hs.write("typing", [TypingRow("!r:test", ("@a:test",))])
    ...
    await hs.stop()
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, cast
from urllib.parse import unquote

from twisted.internet import defer, task
from twisted.web import resource, server

from synrepl._client_core import TransportFactory
from synrepl.connection import TransportOptions
from synrepl.testing.writers import (
    UPDATES_PATH,
    Faults,
    HistoryFetcher,
    SimulatedWriters,
    WriterState,
)
from synrepl.twisted.redis_transport import RedisTransport

__all__ = ("FakeHomeserver", "Faults", "HistoryFetcher")

_UPDATES_PATH_BYTES = UPDATES_PATH.encode()


class FakeHomeserver(SimulatedWriters):
    """Simulated stream writers on Twisted, publishing on a real Redis or an
    in-memory one (see the module docs; what the writers do is
    :class:`~synrepl.testing.writers.SimulatedWriters`).

    Args:
        reactor: the Twisted reactor (or a ``task.Clock``, with ``http=False``).
        server_name: the homeserver name, which is also the Redis channel.
        writers: the writer instance names (the first is the main process;
            name it ``master`` to look like Synapse).
        redis_host: the Redis to publish on.
        redis_port: its port.
        secret: the replication secret the HTTP endpoint demands (None: none).
        page_limit: rows per ``get_repl_stream_updates`` page.
        transport_options: the ``RedisTransport``'s options (keepalive, backoff, ...).
        transport_factory: builds the transport instead of a ``RedisTransport``
            on ``redis_host:redis_port``; ``MemoryRedis(clock).connect`` (from
            ``synrepl.testing.memory``) puts the homeserver in memory.
        writes: writer -> more streams it writes, answered on REPLICATE
            before it writes any row (the configuration's stream writers and
            ``caches`` always are).
        http: serve each writer's history over HTTP on a loopback port;
            False serves it only through :meth:`fetcher`, in process (for a
            ``task.Clock`` test, which cannot listen).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        server_name: str = "test.local",
        writers: Sequence[str] = ("master",),
        redis_host: str = "127.0.0.1",
        redis_port: int = 6379,
        secret: str | None = "synrepl-test-secret",
        page_limit: int = 100,
        transport_options: TransportOptions | None = None,
        transport_factory: TransportFactory | None = None,
        writes: Mapping[str, Sequence[str]] | None = None,
        http: bool = True,
    ) -> None:
        super().__init__(
            server_name=server_name,
            writers=writers,
            redis_host=redis_host,
            redis_port=redis_port,
            secret=secret,
            page_limit=page_limit,
            writes=writes,
        )
        self._reactor = reactor
        self._http = http
        self._ports: dict[str, Any] = {}
        factory = transport_factory or partial(RedisTransport, reactor, self._redis)
        self._transport = self._connect(factory, transport_options)
        #: Messages that could not be published (Redis down): lost on the wire,
        #: as they would be for Synapse; a later POSITION reveals the rows.
        self.publish_failures = 0
        self._ready: defer.Deferred[None] = defer.Deferred()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen for HTTP on free loopback ports (unless ``http=False``) and
        connect to Redis; returns once subscribed."""
        for writer in self._writers.values() if self._http else ():
            site = server.Site(_UpdatesResource(self, writer))  # type: ignore[no-untyped-call]
            self._ports[writer.name] = self._reactor.listenTCP(0, site, interface="127.0.0.1")
        self._transport.start()
        await self._ready

    async def stop(self) -> None:
        ports, self._ports = self._ports, {}
        for port in ports.values():
            await port.stopListening()
        await self._transport.stop()

    def http_port(self, writer: str) -> int:
        """The loopback port on which ``writer`` serves its history (with
        ``http=False``: a placeholder nothing listens on)."""
        listening = self._ports.get(writer)
        if listening is None:
            return super().http_port(writer)
        port: int = listening.getHost().port
        return port

    def fetcher(self) -> HistoryFetcher:
        """The writers' histories in process: a ``fetcher`` for a client that
        reads them without HTTP (``http_delay`` still holds each answer back)."""
        return HistoryFetcher(self, partial(task.deferLater, self._reactor))

    def publish_raw(self, line: str) -> defer.Deferred[int]:
        """Publish any line as it is (garbage included) on the main channel."""
        return self._published(line)

    # ------------------------------------------------------------ internals

    def _published(self, line: str) -> defer.Deferred[int]:
        # A Twisted transport (Redis or in memory) answers with a Deferred.
        return cast(defer.Deferred[int], self._transport.publish(self.server_name, line))

    def _publish(self, line: str) -> None:
        try:
            d = self._published(line)
        except Exception:  # noqa: BLE001 - Redis down: the message is lost, as on a real wire
            self.publish_failures += 1
            return
        d.addErrback(self._publish_failed)

    def _publish_failed(self, _: object) -> None:
        self.publish_failures += 1

    def _announce_all(self) -> None:
        if not self._ready.called:
            self._ready.callback(None)
        super()._announce_all()


class _UpdatesResource(resource.Resource):
    """``GET /_synapse/replication/get_repl_stream_updates/<stream>/<txn>``."""

    isLeaf = True

    def __init__(self, hs: FakeHomeserver, writer: WriterState) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._hs = hs
        self._writer = writer

    def render_GET(self, request: server.Request) -> bytes | int:
        path = request.path
        query = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
        self._hs.http_requests.append((self._writer.name, path.decode(), query))
        request.setHeader(b"Content-Type", b"application/json")  # type: ignore[no-untyped-call]
        if not self._hs._check_secret(request.getHeader("authorization")):
            request.setResponseCode(500)
            return _error("M_UNKNOWN", "Internal server error")
        if not path.startswith(_UPDATES_PATH_BYTES):
            request.setResponseCode(400)
            return _error("M_UNRECOGNIZED", "Unrecognized request")
        parts = path[len(_UPDATES_PATH_BYTES) :].split(b"/")
        if len(parts) != 2 or not parts[1]:
            request.setResponseCode(400)
            return _error("M_UNRECOGNIZED", "Unrecognized request")
        stream = unquote(parts[0].decode())
        try:
            from_token = int(query["from_token"])
            upto_token = int(query["upto_token"])
        except (KeyError, ValueError):
            request.setResponseCode(400)
            return _error("M_MISSING_PARAM", "from_token and upto_token are required")
        if self._hs.on_updates_request is not None:
            self._hs.on_updates_request(self._writer.name, stream, from_token, upto_token)
        delay = self._hs.http_delay
        if delay <= 0:
            body = self._hs._updates(self._writer, stream, from_token, upto_token)
            return json.dumps(body).encode()

        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def answer() -> None:
            if gone:  # the client hung up meanwhile
                return
            # The history as it is when the answer is made, as for a busy writer.
            late = self._hs._updates(self._writer, stream, from_token, upto_token)
            request.write(json.dumps(late).encode())  # type: ignore[no-untyped-call]
            request.finish()  # type: ignore[no-untyped-call]

        self._hs._reactor.callLater(delay, answer)
        return server.NOT_DONE_YET


def _error(errcode: str, message: str) -> bytes:
    return json.dumps({"errcode": errcode, "error": message}).encode()
