"""Watching replication from the outside, independently of synrepl.

- :class:`WireTap`: a plain redis-py subscriber on the cluster's channel, in
  a thread, that records every line exactly as Synapse published it.  The
  suite compares what synrepl delivered against it.
- :class:`MonitorTap`: Redis ``MONITOR`` in a thread, to see every command
  every connection sent.
- :class:`Recorder`: the row handler given to synrepl, with queries.
- :func:`start_client`: a synrepl ``ReplicationClient`` started and waited on
  until the writers' POSITIONs have connected the streams asked for.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import redis
from client_helpers import make_client, wait_until

from synrepl.config import SynapseConfig
from synrepl.positions import GapUnfillable, RowsReceived
from synrepl.streams import RawRow, Row

Key = tuple[str, str, int]  # (stream, writer, token)


class WireTap:
    """Every line published on ``channel`` (and its sub-channels), in order."""

    def __init__(self, port: int, channel: str) -> None:
        self._redis = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        self._pubsub = self._redis.pubsub()
        self._channel = channel
        self._stop = threading.Event()
        self.lines: list[tuple[str, str]] = []
        self._thread = threading.Thread(target=self._run, name=f"wiretap-{channel}", daemon=True)

    def start(self) -> WireTap:
        self._pubsub.subscribe(self._channel)
        self._pubsub.psubscribe(self._channel + "/*")
        # Wait for both confirmations so that nothing published later is missed.
        confirmed = 0
        deadline = time.monotonic() + 10
        while confirmed < 2:
            msg = self._pubsub.get_message(ignore_subscribe_messages=False, timeout=1)
            if msg is not None and msg["type"] in ("subscribe", "psubscribe"):
                confirmed += 1
            if time.monotonic() > deadline:
                raise RuntimeError("wire tap did not subscribe")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._pubsub.get_message(timeout=0.2)
            except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError):
                # Redis went away (a test restarts it): the tap is blind until
                # it resubscribes, which redis-py does on the next call.
                time.sleep(0.1)
                continue
            if msg is None or msg["type"] not in ("message", "pmessage"):
                continue
            channel = msg["channel"].decode()
            self.lines.append((channel, msg["data"].decode()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._pubsub.close()
        self._redis.close()

    def commands(self, name: str) -> list[list[str]]:
        """The arguments of every ``name`` command seen on the main channel."""
        out = []
        splits = {"RDATA": 3, "POSITION": 3}
        for channel, line in list(self.lines):
            if channel != self._channel:
                continue
            cmd, _, rest = line.partition(" ")
            if cmd == name:
                out.append(rest.split(" ", splits.get(name, -1)))
        return out

    def rdata(self) -> dict[Key, list[Any]]:
        """RDATA rows by (stream, writer, token), batches assembled as Synapse
        assembles them (``batch`` rows belong to the writer's next numeric token)."""
        pending: dict[tuple[str, str], list[Any]] = defaultdict(list)
        out: dict[Key, list[Any]] = defaultdict(list)
        for stream, writer, token, row in self.commands("RDATA"):
            pending[(stream, writer)].append(json.loads(row))
            if token != "batch":
                out[(stream, writer, int(token))].extend(pending.pop((stream, writer)))
        return dict(out)

    def positions(self) -> list[tuple[str, str, int, int]]:
        return [(s, w, int(p), int(n)) for s, w, p, n in self.commands("POSITION")]

    def announced(self) -> dict[tuple[str, str], int]:
        """(stream, writer) -> the token of its last RDATA or POSITION on the wire."""
        newest: dict[tuple[str, str], int] = {}
        for _, line in list(self.lines):
            parts = line.split(" ", 4)
            if parts[0] == "RDATA" and len(parts) == 5 and parts[3] != "batch":
                newest[(parts[1], parts[2])] = int(parts[3])
            elif parts[0] == "POSITION" and len(parts) == 5:
                newest[(parts[1], parts[2])] = int(parts[4])
        return newest


class MonitorTap:
    """Redis MONITOR: every command any connection sends, with its address."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._stop = threading.Event()
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)

    def start(self) -> MonitorTap:
        self._sock.sendall(b"MONITOR\r\n")
        reply = self._readline()
        if reply != "+OK":
            raise RuntimeError(f"MONITOR refused: {reply!r}")
        self._sock.settimeout(0.2)
        self._thread.start()
        return self

    _buffer = b""

    def _readline(self) -> str:
        while b"\r\n" not in self._buffer:
            self._buffer += self._sock.recv(65536)
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                line = self._readline()
            except TimeoutError:
                continue
            except OSError:
                return
            self.lines.append(line)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def by_address(self, address: str) -> list[str]:
        """The commands sent from one ``ip:port``, e.g. ``"SUBSCRIBE" "chan"``."""
        marker = f" {address}] "
        return [line.split("] ", 1)[1] for line in self.lines if marker in line]

    def publishes(self) -> list[tuple[str, str]]:
        """(address, line) of every PUBLISH."""
        out = []
        for line in self.lines:
            if '] "PUBLISH" ' in line or '] "publish" ' in line:
                address = line.split("] ", 1)[0].rsplit(" ", 1)[-1]
                out.append((address, line.split("] ", 1)[1]))
        return out


class Recorder:
    """synrepl's row handler in these tests: keeps every batch and every gap."""

    def __init__(self) -> None:
        self.batches: list[RowsReceived] = []
        self.gaps: list[GapUnfillable] = []

    def __call__(self, batch: RowsReceived) -> None:
        self.batches.append(batch)

    def gap(self, gap: GapUnfillable) -> None:
        self.gaps.append(gap)

    def rows(
        self,
        stream: str | None = None,
        type: type[Row] | None = None,
        writer: str | None = None,
        where: Callable[[Any], bool] | None = None,
    ) -> list[Any]:
        out = []
        for b in self.batches:
            if stream is not None and b.stream != stream:
                continue
            if writer is not None and b.writer != writer:
                continue
            for row in b.rows:
                if type is not None and not isinstance(row, type):
                    continue
                if where is not None and not where(row):
                    continue
                out.append(row)
        return out

    def keyed(self) -> dict[Key, list[Any]]:
        """Raw rows by (stream, writer, token), as :meth:`WireTap.rdata` gives them."""
        out: dict[Key, list[Any]] = {}
        for b in self.batches:
            key = (b.stream, b.writer, b.token)
            if key in out:
                raise AssertionError(f"token delivered twice: {key}")
            out[key] = [row.to_raw() for row in b.rows]
        return out

    def untyped(self) -> list[Any]:
        """Rows synrepl could not fully type (raw fallbacks, or extra fields)."""
        return [
            (b.stream, b.writer, b.token, row)
            for b in self.batches
            for row in b.rows
            if isinstance(row, RawRow) or not isinstance(row, Row) or row.extras
        ]

    def assert_in_order_once(self) -> None:
        """Per (stream, writer), tokens strictly increase: nothing twice, nothing back."""
        last: dict[tuple[str, str], int] = {}
        for b in self.batches:
            pair = (b.stream, b.writer)
            assert b.token > last.get(pair, -(2**63)), (
                f"{pair} went from {last.get(pair)} to {b.token}"
            )
            last[pair] = b.token

    async def wait_for(
        self,
        what: str,
        stream: str | None = None,
        type: type[Row] | None = None,
        writer: str | None = None,
        where: Callable[[Any], bool] | None = None,
        count: int = 1,
        timeout: float = 20.0,
    ) -> list[Any]:
        await wait_until(
            lambda: len(self.rows(stream, type, writer, where)) >= count,
            timeout=timeout,
            what=what,
        )
        return self.rows(stream, type, writer, where)


def connected_streams(client: Any) -> dict[str, set[str]]:
    return {stream: set(writers) for stream, writers in client.positions().items()}


async def start_client(
    config: SynapseConfig,
    expect: Mapping[str, Collection[str]],
    recorder: Recorder | None = None,
    timeout: float = 20.0,
    adapter: str = "twisted",
    **kwargs: Any,
) -> Any:
    """Start a ReplicationClient of ``adapter``; return once every ``expect``ed
    stream has a position for each of its writers."""
    client = make_client(adapter, config, **kwargs)
    if recorder is not None:
        client.on_rows(None, recorder)
        client.on_gap(recorder.gap)
    await client.start()
    await wait_until(
        lambda: all(
            set(writers) <= connected_streams(client).get(stream, set())
            for stream, writers in expect.items()
        ),
        timeout=timeout,
        what=f"POSITIONs for {dict(expect)}",
    )
    return client


def every(streams: Iterable[str], writers: Collection[str]) -> dict[str, Collection[str]]:
    return {s: writers for s in streams}


class Observation:
    """A synrepl client and an independent wire tap on one deployment.

    ``since`` is the client's position map once connected: comparisons with
    the wire only look at tokens past it.
    """

    def __init__(
        self, config: SynapseConfig, redis_port: int, adapter: str = "twisted", **client_kwargs: Any
    ) -> None:
        self.config = config
        self.adapter = adapter
        self.tap = WireTap(redis_port, config.server_name)
        self.rec = Recorder()
        self._client_kwargs = client_kwargs
        self.client: Any = None
        self.since: dict[str, dict[str, int]] = {}

    async def start(self, expect: Mapping[str, Collection[str]]) -> Observation:
        self.tap.start()
        self.client = await start_client(
            self.config, expect, self.rec, adapter=self.adapter, **self._client_kwargs
        )
        self.since = self.client.positions()
        return self

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.stop()
            if self.client.http is not None:
                await self.client.http.close()
        self.tap.stop()

    def _since(self, key: Key) -> bool:
        stream, writer, token = key
        return token > self.since.get(stream, {}).get(writer, -(2**63))

    def wire(self) -> dict[Key, list[Any]]:
        return {k: v for k, v in self.tap.rdata().items() if self._since(k)}

    def delivered(self) -> dict[Key, list[Any]]:
        return {k: v for k, v in self.rec.keyed().items() if self._since(k)}

    async def assert_matches_wire(self, timeout: float = 20.0) -> None:
        """Every RDATA row Synapse published since the client connected was
        delivered once, typed, equal to the wire row, with its writer and
        token; and nothing else was."""

        def fetched() -> set[Key]:
            return {(b.stream, b.writer, b.token) for b in self.rec.batches if b.fetched}

        try:
            await wait_until(
                lambda: set(self.delivered()) >= set(self.wire()),
                timeout=timeout,
                what="synrepl to deliver every row seen on the wire",
            )
        except AssertionError:
            missing = sorted(set(self.wire()) - set(self.delivered()))
            raise AssertionError(f"rows on the wire never delivered: {missing[:20]}") from None
        # Rows may be delivered that are not on the wire only when they were
        # fetched over HTTP (published while the tap was blind, or never
        # published as RDATA).  The tap reads on a thread of its own and may
        # be behind the client: give it time to see the rest.
        with contextlib.suppress(AssertionError):
            await wait_until(
                lambda: set(self.delivered()) - set(self.wire()) <= fetched(),
                timeout=timeout,
                what="the tap to see every row synrepl was sent",
            )
        wire, delivered = self.wire(), self.delivered()
        extra = {k: v for k, v in delivered.items() if k not in wire}
        assert set(extra) <= fetched(), f"rows delivered that Synapse never sent: {extra}"
        for key, rows in wire.items():
            assert delivered[key] == rows, f"{key}: synrepl {delivered[key]} != wire {rows}"
        assert self.rec.untyped() == [], f"untyped rows: {self.rec.untyped()}"
        self.rec.assert_in_order_once()
        assert self.rec.gaps == [], f"gaps reported: {self.rec.gaps}"
