"""The simulated homeserver's writers, without I/O.

:class:`SimulatedWriters` is what Synapse's stream writers do where a
worker can tell: tokens of a stream are one sequence shared by all its
writers (Synapse's multi-writer id generators), increasing per writer; rows
sharing a token go out as ``batch`` rows completed by one numeric-token
row; each writer answers ``REPLICATE`` with a ``POSITION`` for every stream
it writes (written or not); its history is served in pages that end on a
token boundary; its next lines can be dropped, duplicated or reordered; and
a writer can restart (its in-memory streams start again from 0).
It hands each line to :meth:`SimulatedWriters._publish`, which an adapter
carries out: :class:`~synrepl.testing.homeserver.FakeHomeserver` on
Twisted (real Redis or in memory, history over HTTP or in process),
:class:`~synrepl.testing.asyncio_homeserver.AsyncioHomeserver` on asyncio.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from synrepl import _json
from synrepl._client_core import Transport, TransportFactory
from synrepl.commands import PositionCommand, ReplicateCommand, encode, parse_line
from synrepl.config import RedisConfig, SynapseConfig, config_from_dict
from synrepl.connection import TransportOptions
from synrepl.errors import ProtocolError
from synrepl.http import StreamUpdates
from synrepl.positions import RESETTABLE_STREAMS
from synrepl.releases import SynapseRelease, facts_for
from synrepl.sharding import canonical_instance_name
from synrepl.streams import Row

__all__ = ("SimulatedWriters", "Faults", "WriterState", "HistoryFetcher", "UPDATES_PATH")

#: The HTTP path of ``get_repl_stream_updates`` (``<stream>/<txn_id>`` follows).
UPDATES_PATH = "/_synapse/replication/get_repl_stream_updates/"


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
class WriterState:
    name: str
    #: Streams it answers REPLICATE for even before writing them.
    writes: list[str] = attrs.Factory(list)
    history: dict[str, list[tuple[int, Any]]] = attrs.Factory(dict)
    last_sent: dict[str, int] = attrs.Factory(dict)
    faults: Faults = attrs.Factory(Faults)


class SimulatedWriters:
    """Stream writers of one homeserver (see the module docs).

    Args:
        server_name: the homeserver name, which is also the Redis channel.
        writers: the writer instance names (the first is the main process;
            name it ``master`` to look like Synapse).
        redis_host: the Redis host the configuration names.
        redis_port: its port.
        secret: the replication secret its HTTP history demands (None: none).
        page_limit: rows per ``get_repl_stream_updates`` page.
        writes: writer -> more streams it writes, answered on REPLICATE
            before it writes any row (the configuration's stream writers and
            ``caches`` always are).
        release: the Synapse release to look like: the streams it lacks are
            never announced (a process of that release would fail on them).
            None: the newest's.
    """

    def __init__(
        self,
        *,
        server_name: str = "test.local",
        writers: Sequence[str] = ("master",),
        redis_host: str = "127.0.0.1",
        redis_port: int = 6379,
        secret: str | None = "synrepl-test-secret",
        page_limit: int = 100,
        writes: Mapping[str, Sequence[str]] | None = None,
        release: SynapseRelease | None = None,
    ) -> None:
        if not writers:
            raise ValueError("a homeserver needs at least one writer")
        self.server_name = server_name
        self.secret = secret
        self.page_limit = page_limit
        self._redis = RedisConfig(enabled=True, host=redis_host, port=redis_port)
        self._writers = {name: WriterState(name) for name in writers}
        # Like Synapse, a writer answers REPLICATE for every stream it writes,
        # written or not: those the configuration gives it, and caches (everyone).
        sharding = config_from_dict(self._config_data(lambda name: 1)).stream_writers
        for w in self._writers.values():
            w.writes.extend(sharding.streams_written_by(w.name))
        for name, streams in (writes or {}).items():
            self._writer(name).writes.extend(
                s for s in streams if s not in self._writer(name).writes
            )
        if release is not None:
            known = facts_for(release).streams
            for w in self._writers.values():
                w.writes[:] = [s for s in w.writes if s in known]
        self._sequences: dict[str, int] = {}
        #: ``(writer, path, query)`` of every history request, HTTP or in process.
        self.http_requests: list[tuple[str, str, Mapping[str, str]]] = []
        #: How many REPLICATE commands (from anyone) this homeserver answered.
        self.replicates_seen = 0
        #: Seconds every history answer is held back: a busy writer.
        self.http_delay = 0.0
        #: Called as ``(writer, stream, from_token, upto_token)`` when an
        #: update request arrives, before it is answered.
        self.on_updates_request: Callable[[str, str, int, int], None] | None = None

    # ------------------------------------------------------------ what adapters provide

    def _connect(self, factory: TransportFactory, options: TransportOptions | None) -> Transport:
        """The adapter's transport on the homeserver's channel, wired to the
        writers: REPLICATE is answered, and every (re)subscription announces."""
        return factory(
            [self.server_name],
            on_line=self._on_line,
            on_subscribed=self._announce_all,
            on_connection_lost=lambda: None,
            on_attempt_failed=None,
            publish_enabled=True,
            options=options or TransportOptions(),
        )

    def _publish(self, line: str) -> None:
        """Publish ``line`` on the homeserver's channel."""
        raise NotImplementedError

    def http_port(self, writer: str) -> int:
        """Where ``writer`` serves its history (a placeholder when nothing listens)."""
        return 1 + list(self._writers).index(writer)

    # ------------------------------------------------------------ configuration

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

    def _send_rows(self, w: WriterState, stream: str, token: int, raws: Sequence[Any]) -> None:
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

    def restart(self, writer: str | None = None) -> None:
        """The writer process restarts: the streams it keeps in memory
        (``RESETTABLE_STREAMS``: typing, ...) start again from 0 with an empty
        history, and it announces a POSITION for every stream it writes, as a
        Synapse process does when it connects."""
        w = self._writer(writer)
        for stream in RESETTABLE_STREAMS:
            if stream in w.writes or stream in w.history:
                self._sequences[stream] = 0
                w.history.pop(stream, None)
                w.last_sent[stream] = 0
        self._announce(w)

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

    # ------------------------------------------------------------ what the channel says

    def _on_line(self, channel: str, line: str) -> None:
        try:
            cmd = parse_line(line)
        except ProtocolError:
            return
        if isinstance(cmd, ReplicateCommand):
            self.replicates_seen += 1
            self._announce_all()

    def _announce_all(self) -> None:
        for w in self._writers.values():
            self._announce(w)

    def _announce(self, w: WriterState) -> None:
        """``POSITION <stream> <writer> <last> <last>`` for every stream it writes."""
        for stream in dict.fromkeys([*w.writes, *w.history]):
            last = w.last_sent.get(stream, 0)
            self._publish(encode(PositionCommand(stream, w.name, last, last)))

    def _updates(
        self, w: WriterState, stream: str, from_token: int, upto_token: int
    ) -> dict[str, Any]:
        rows = [(t, r) for t, r in w.history.get(stream, []) if from_token < t <= upto_token]
        limited = False
        if len(rows) > self.page_limit:
            # A page ends on a token boundary: rows sharing a token stay together.
            cut = rows[self.page_limit - 1][0]
            rows = [(t, r) for t, r in rows if t <= cut]
            upto_token, limited = cut, True
        return {"updates": [[t, r] for t, r in rows], "upto_token": upto_token, "limited": limited}

    def _check_secret(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries the secret."""
        return self.secret is None or authorization == f"Bearer {self.secret}"

    def history_page(
        self, writer: str, stream: str, from_token: int, upto_token: int
    ) -> StreamUpdates:
        """One page of ``writer``'s history, as the endpoint answers it (and
        recorded as a request)."""
        w = self._writer(canonical_instance_name(writer))
        query = {"from_token": str(from_token), "upto_token": str(upto_token)}
        self.http_requests.append((w.name, f"{UPDATES_PATH}{stream}/in-process", query))
        body = self._updates(w, stream, from_token, upto_token)
        return StreamUpdates(
            [(int(t), r) for t, r in body["updates"]], body["upto_token"], body["limited"]
        )

    # ------------------------------------------------------------ internals

    def _writer(self, name: str | None) -> WriterState:
        if name is None:
            return next(iter(self._writers.values()))
        try:
            return self._writers[name]
        except KeyError:
            raise ValueError(f"no writer {name!r}; writers: {sorted(self._writers)}") from None

    def _send(self, w: WriterState, line: str) -> None:
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


class HistoryFetcher:
    """``get_repl_stream_updates`` answered from a homeserver's memory.

    Args:
        writers: whose history.
        sleep: ``sleep(seconds)`` returns an awaitable of the adapter's kind,
            for ``http_delay``.
    """

    def __init__(self, writers: SimulatedWriters, sleep: Any) -> None:
        self._writers = writers
        self._sleep = sleep

    async def get_repl_stream_updates(
        self, instance: str, stream: str, from_token: int, upto_token: int
    ) -> StreamUpdates:
        writers = self._writers
        instance = canonical_instance_name(instance)
        if writers.on_updates_request is not None:
            writers.on_updates_request(instance, stream, from_token, upto_token)
        if writers.http_delay > 0:
            await self._sleep(writers.http_delay)
        # The history as it is when the answer is made, as for a busy writer.
        return writers.history_page(instance, stream, from_token, upto_token)
