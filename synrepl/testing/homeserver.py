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
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast
from urllib.parse import unquote

import attrs
from twisted.internet import defer, task
from twisted.web import resource, server

from synrepl import _json
from synrepl._client_core import TransportFactory
from synrepl.commands import PositionCommand, ReplicateCommand, encode, parse_line
from synrepl.config import RedisConfig, SynapseConfig, config_from_dict
from synrepl.connection import TransportOptions
from synrepl.errors import ProtocolError
from synrepl.http import StreamUpdates
from synrepl.sharding import canonical_instance_name
from synrepl.streams import STREAM_NAMES, Row
from synrepl.twisted.redis_transport import RedisTransport

__all__ = ("FakeHomeserver", "Faults", "HistoryFetcher")

_UPDATES_PATH = b"/_synapse/replication/get_repl_stream_updates/"


@attrs.define
class Faults:
    """What the wire does to the next messages a writer publishes."""

    #: Drop this many of the next messages.
    drop: int = 0
    #: Send each of this many next messages twice.
    duplicate: int = 0
    #: Hold this many next messages back and send them in reverse order.
    reverse: int = 0
    held: list[str] = attrs.Factory(list)


@attrs.define
class _Writer:
    name: str
    #: Streams it answers REPLICATE for even before writing them.
    writes: list[str] = attrs.Factory(list)
    history: dict[str, list[tuple[int, Any]]] = attrs.Factory(dict)
    last_sent: dict[str, int] = attrs.Factory(dict)
    faults: Faults = attrs.Factory(Faults)
    port: Any = None


class FakeHomeserver:
    """Simulated stream writers publishing on a real Redis (see the module docs).

    Args:
        reactor: the Twisted reactor.
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
        writes: writer -> the streams it writes, which it answers REPLICATE
            for before writing any row, as Synapse's writers do (the events
            writers always answer for ``events``).
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
        if not writers:
            raise ValueError("a homeserver needs at least one writer")
        self._reactor = reactor
        self.server_name = server_name
        self.secret = secret
        self.page_limit = page_limit
        self._redis = RedisConfig(enabled=True, host=redis_host, port=redis_port)
        self._writers = {name: _Writer(name) for name in writers}
        # Like Synapse, a writer answers REPLICATE for every stream it writes,
        # written or not: those config_dict gives it, and caches (everyone).
        sharding = config_from_dict(self._config_data(lambda name: 1)).stream_writers
        for stream in STREAM_NAMES:
            for name in sharding.writers_for_stream(stream):
                if name in self._writers:
                    self._writers[name].writes.append(stream)
        for w in self._writers.values():
            w.writes.append("caches")
        for name, streams in (writes or {}).items():
            self._writer(name).writes.extend(
                s for s in streams if s not in self._writer(name).writes
            )
        self._sequences: dict[str, int] = {}
        self.http_requests: list[tuple[str, str, Mapping[str, str]]] = []
        self._http = http
        factory = transport_factory or partial(RedisTransport, reactor, self._redis)
        self._transport = factory(
            [server_name],
            on_line=self._on_line,
            on_subscribed=self._announce_all,
            on_connection_lost=lambda: None,
            on_attempt_failed=None,
            publish_enabled=True,
            options=transport_options or TransportOptions(),
        )
        #: Messages that could not be published (Redis down): lost on the wire,
        #: as they would be for Synapse; a later POSITION reveals the rows.
        self.publish_failures = 0
        #: How many REPLICATE commands (from anyone) this homeserver answered.
        self.replicates_seen = 0
        #: Seconds every HTTP answer is held back: a busy writer.
        self.http_delay = 0.0
        #: Called as ``(writer, stream, from_token, upto_token)`` when an
        #: update request arrives, before it is answered.
        self.on_updates_request: Callable[[str, str, int, int], None] | None = None
        self._ready: defer.Deferred[None] = defer.Deferred()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen for HTTP on free loopback ports (unless ``http=False``) and
        connect to Redis; returns once subscribed."""
        for writer in self._writers.values() if self._http else ():
            site = server.Site(_UpdatesResource(self, writer))  # type: ignore[no-untyped-call]
            writer.port = self._reactor.listenTCP(0, site, interface="127.0.0.1")
        self._transport.start()
        await self._ready

    async def stop(self) -> None:
        for writer in self._writers.values():
            if writer.port is not None:
                await writer.port.stopListening()
                writer.port = None
        await self._transport.stop()

    def http_port(self, writer: str) -> int:
        """The loopback port on which ``writer`` serves its history (with
        ``http=False``: a placeholder nothing listens on)."""
        listening = self._writers[writer].port
        if listening is None:
            return 1 + list(self._writers).index(writer)
        port: int = listening.getHost().port
        return port

    def fetcher(self) -> HistoryFetcher:
        """The writers' histories in process: a ``fetcher`` for a client that
        reads them without HTTP (``http_delay`` still holds each answer back)."""
        return HistoryFetcher(self)

    def config(self, **overrides: Any) -> SynapseConfig:
        """A config for a worker of this homeserver (every writer in instance_map)."""
        return config_from_dict(self.config_dict(**overrides))

    def config_dict(self, **overrides: Any) -> dict[str, Any]:
        """The same as a homeserver.yaml-shaped dict, to extend or write out."""
        data = self._config_data(self.http_port)
        data.update(overrides)
        return data

    def _config_data(self, port_of: Callable[[str], int]) -> dict[str, Any]:
        names = list(self._writers)
        instance_map = {
            ("main" if name == "master" else name): {"host": "127.0.0.1", "port": port_of(name)}
            for name in names
        }
        data: dict[str, Any] = {
            "server_name": self.server_name,
            "redis": {"enabled": True, "host": self._redis.host, "port": self._redis.port},
            "instance_map": instance_map,
        }
        if self.secret is not None:
            data["worker_replication_secret"] = self.secret
        persisters = [n for n in names if n != "master"] or ["master"]
        data["stream_writers"] = {"events": persisters}
        return data

    # ------------------------------------------------------------ writing

    def write(self, stream: str, rows: Sequence[Row | Any], *, writer: str | None = None) -> int:
        """Persist ``rows`` at one new token of ``stream`` and publish them.

        ``rows`` are typed rows or raw JSON rows.  Returns the token.
        """
        w = self._writer(writer)
        if not rows:
            raise ValueError("write at least one row")
        token = self._sequences.get(stream, 0) + 1
        self._sequences[stream] = token
        raws = [row.to_raw() if isinstance(row, Row) else row for row in rows]
        w.history.setdefault(stream, []).extend((token, raw) for raw in raws)
        self._send_rows(w, stream, token, raws)
        w.last_sent[stream] = token
        return token

    def resend(self, stream: str, token: int, *, writer: str | None = None) -> None:
        """Publish the rows of ``token`` again, the whole batch: what a consumer
        sees when live rows overlap rows it already fetched."""
        w = self._writer(writer)
        raws = [raw for t, raw in w.history.get(stream, []) if t == token]
        if not raws:
            raise ValueError(f"{w.name} wrote nothing to {stream} at {token}")
        self._send_rows(w, stream, token, raws)

    def _send_rows(self, w: _Writer, stream: str, token: int, raws: Sequence[Any]) -> None:
        for index, raw in enumerate(raws):
            last = index == len(raws) - 1
            self._send(
                w, f"RDATA {stream} {w.name} {token if last else 'batch'} {_json.dumps(raw)}"
            )

    def write_silently(
        self, stream: str, rows: Sequence[Row | Any], *, writer: str | None = None
    ) -> int:
        """Persist rows without publishing them: only a later POSITION reveals them."""
        w = self._writer(writer)
        saved = w.faults.drop
        w.faults.drop = len(rows)
        try:
            return self.write(stream, rows, writer=writer)
        finally:
            w.faults.drop = saved

    def position(self, stream: str, *, writer: str | None = None) -> None:
        """Publish ``POSITION stream writer <last sent> <current>`` (Synapse does
        this when a stream moved without rows for this writer)."""
        w = self._writer(writer)
        current = self._sequences.get(stream, 0)
        prev = w.last_sent.get(stream, current)
        self._send(w, encode(PositionCommand(stream, w.name, prev, current)))
        w.last_sent[stream] = current

    def token(self, stream: str) -> int:
        """The stream's current token (the shared sequence)."""
        return self._sequences.get(stream, 0)

    def history(self, stream: str, *, writer: str | None = None) -> list[tuple[int, Any]]:
        """Every row ``writer`` wrote to ``stream``, as (token, raw JSON)."""
        return list(self._writer(writer).history.get(stream, []))

    def faults(self, writer: str | None = None) -> Faults:
        """The fault settings of ``writer``'s next messages (mutable)."""
        return self._writer(writer).faults

    def flush_held(self, writer: str | None = None) -> None:
        """Send any messages held back for reordering, newest first."""
        w = self._writer(writer)
        held, w.faults.held = w.faults.held, []
        w.faults.reverse = 0
        for line in reversed(held):
            self._publish(line)

    def publish_raw(self, line: str) -> defer.Deferred[int]:
        """Publish any line as it is (garbage included) on the main channel."""
        return self._published(line)

    # ------------------------------------------------------------ internals

    def _published(self, line: str) -> defer.Deferred[int]:
        # A Twisted transport (Redis or in memory) answers with a Deferred.
        return cast(defer.Deferred[int], self._transport.publish(self.server_name, line))

    def _writer(self, name: str | None) -> _Writer:
        if name is None:
            return next(iter(self._writers.values()))
        try:
            return self._writers[name]
        except KeyError:
            raise ValueError(f"no writer {name!r}; writers: {sorted(self._writers)}") from None

    def _send(self, w: _Writer, line: str) -> None:
        faults = w.faults
        if faults.drop > 0:
            faults.drop -= 1
            return
        if faults.reverse > 0:
            faults.held.append(line)
            if len(faults.held) >= faults.reverse:
                self.flush_held(w.name)
            return
        self._publish(line)
        if faults.duplicate > 0:
            faults.duplicate -= 1
            self._publish(line)

    def _publish(self, line: str) -> None:
        try:
            d = self._published(line)
        except Exception:  # noqa: BLE001 - Redis down: the message is lost, as on a real wire
            self.publish_failures += 1
            return
        d.addErrback(self._publish_failed)

    def _publish_failed(self, _: object) -> None:
        self.publish_failures += 1

    def _on_line(self, channel: str, line: str) -> None:
        try:
            cmd = parse_line(line)
        except ProtocolError:
            return
        if isinstance(cmd, ReplicateCommand):
            self.replicates_seen += 1
            self._announce_all()

    def _announce_all(self) -> None:
        if not self._ready.called:
            self._ready.callback(None)
        for w in self._writers.values():
            for stream in dict.fromkeys([*w.writes, *w.history]):
                last = w.last_sent.get(stream, 0)
                self._publish(encode(PositionCommand(stream, w.name, last, last)))

    def _updates(self, w: _Writer, stream: str, from_token: int, upto_token: int) -> dict[str, Any]:
        rows = [(t, r) for t, r in w.history.get(stream, []) if from_token < t <= upto_token]
        limited = False
        if len(rows) > self.page_limit:
            # A page ends on a token boundary: rows sharing a token stay together.
            cut = rows[self.page_limit - 1][0]
            rows = [(t, r) for t, r in rows if t <= cut]
            upto_token, limited = cut, True
        return {"updates": [[t, r] for t, r in rows], "upto_token": upto_token, "limited": limited}

    def _check_secret(self, request: server.Request) -> bool:
        if self.secret is None:
            return True
        header = request.getHeader("authorization") or ""
        return header == f"Bearer {self.secret}"


class HistoryFetcher:
    """``get_repl_stream_updates`` answered from the homeserver's memory."""

    def __init__(self, hs: FakeHomeserver) -> None:
        self._hs = hs

    async def get_repl_stream_updates(
        self, instance: str, stream: str, from_token: int, upto_token: int
    ) -> StreamUpdates:
        hs = self._hs
        writer = hs._writer(canonical_instance_name(instance))
        query = {"from_token": str(from_token), "upto_token": str(upto_token)}
        path = f"{_UPDATES_PATH.decode()}{stream}/in-process"
        hs.http_requests.append((writer.name, path, query))
        if hs.on_updates_request is not None:
            hs.on_updates_request(writer.name, stream, from_token, upto_token)
        if hs.http_delay > 0:
            await task.deferLater(hs._reactor, hs.http_delay, lambda: None)
        body = hs._updates(writer, stream, from_token, upto_token)
        updates = [(int(t), r) for t, r in body["updates"]]
        return StreamUpdates(updates, body["upto_token"], body["limited"])


class _UpdatesResource(resource.Resource):
    """``GET /_synapse/replication/get_repl_stream_updates/<stream>/<txn>``."""

    isLeaf = True

    def __init__(self, hs: FakeHomeserver, writer: _Writer) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._hs = hs
        self._writer = writer

    def render_GET(self, request: server.Request) -> bytes | int:
        path = request.path
        query = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
        self._hs.http_requests.append((self._writer.name, path.decode(), query))
        request.setHeader(b"Content-Type", b"application/json")  # type: ignore[no-untyped-call]
        if not self._hs._check_secret(request):
            request.setResponseCode(500)
            return _error("M_UNKNOWN", "Internal server error")
        if not path.startswith(_UPDATES_PATH):
            request.setResponseCode(400)
            return _error("M_UNRECOGNIZED", "Unrecognized request")
        parts = path[len(_UPDATES_PATH) :].split(b"/")
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
