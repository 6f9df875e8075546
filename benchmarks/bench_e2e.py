"""End to end: every consumer of replication traffic on the same corpus, interleaved (a benchmark).

    python benchmarks/bench_e2e.py [--rounds 5] [--repeat 2] [--mode backlog live]
                                   [--only NAME ...]

The repository's corpus (tokens renumbered so that they keep increasing,
see _replay.py; the main channel only, what a client subscribes
to) is replayed into a private redis-server, and each consumer below
takes all of it, in a process of its own (a Twisted reactor runs once per
process), the consumers interleaved round after round:

* ``bare`` -- a blocking socket and ``hiredis.Reader``, each message decoded:
  the ceiling;
* ``txredisapi`` -- a txredisapi subscriber with hiredis (what Synapse
  itself runs on), counting: **the baseline of the ratios**;
* ``redis-py`` -- redis-py's ``redis.asyncio`` pub/sub with hiredis, read
  with ``listen()``: what a transport built on it could do at best;
* ``transport-twisted`` / ``transport-asyncio`` -- synrepl's RedisTransport
  of each adapter, lines handed to a counting callback;
* ``floor-all`` / ``floor-events`` -- the Twisted transport with a callback
  that does what a client does with each line before delivering it (skip
  the commands nobody handles, parse the rest, with ``parse_line`` or the
  events ``SelectiveParser``): the most a client could reach with today's
  transport and parser, delivery costing nothing;
* ``client-twisted-all`` / ``client-asyncio-all`` -- a read-only
  ReplicationClient, all streams, one no-op handler: every line parsed,
  positions kept, every batch delivered;
* ``client-twisted-events`` / ``client-asyncio-events`` -- the same,
  following the events stream only.

Modes:

* ``backlog`` -- the consumer subscribes, the corpus is published while it
  does not read (it waits in Redis and the socket), then it drains it; the
  rate is messages per second of wall time from the first read to the last
  message.
* ``live`` -- the consumer reads while another process publishes as fast as
  it can (pipelined); the publisher may well be the slower side, so the rate
  is messages per second of the consumer's own CPU time between its first
  and its last message.

Every run checks that its consumer got every message, and each client that
its handler was given exactly the rows the traffic holds (per writer, a
token at or below the last one is a duplicate and dropped, as by Synapse),
with no gap and no bad line.  Printed: per consumer, the median rate, the
spread (lowest and highest), and the ratios of medians to the txredisapi
baseline and to the bare ceiling.  No figure here is a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
from _replay import Entries, PrivateRedis, corpus_segments, publish, renumbered

#: Consumers in the order they run within a round (the baseline first).
CONSUMERS = (
    "txredisapi",
    "bare",
    "redis-py",
    "transport-twisted",
    "transport-asyncio",
    "floor-all",
    "floor-events",
    "client-twisted-all",
    "client-asyncio-all",
    "client-twisted-events",
    "client-asyncio-events",
)
BASELINE = "txredisapi"

_RDATA = re.compile(r"RDATA (\S+) (\S+) (\S+) ")
_POSITION = re.compile(r"POSITION (\S+) (\S+) (\d+) (\d+)$")


# --- the traffic ------------------------------------------------------------------------------


def main_channel_entries(repeat: int) -> Entries:
    """The renumbered corpus on the main channel (USER_IP's channel is not followed)."""
    return [e for e in renumbered(corpus_segments(), repeat) if "/" not in e[0]]


def expected_rows(lines: Iterable[str], streams: Sequence[str] | None) -> int:
    """How many rows a client following ``streams`` (None: all) must be given:
    per (stream, writer), a batch of rows ends at a numeric token, and a
    token at or below the writer's last one is a duplicate, dropped whole."""
    last: dict[tuple[str, str], int] = {}
    pending: dict[tuple[str, str], int] = {}
    rows = 0
    for line in lines:
        m = _RDATA.match(line)
        if m is None or (streams is not None and m.group(1) not in streams):
            continue
        pair, token = (m.group(1), m.group(2)), m.group(3)
        if token == "batch":
            pending[pair] = pending.get(pair, 0) + 1
            continue
        batch = pending.pop(pair, 0) + 1
        if int(token) > last.get(pair, -(2**63)):
            last[pair] = int(token)
            rows += batch
    return rows


def start_positions(lines: Iterable[str]) -> dict[str, dict[str, int]]:
    """Each writer's position just before its first token in the traffic, so
    that a read-only client delivers everything live and fetches nothing."""
    first: dict[str, dict[str, int]] = {}
    for line in lines:
        if m := _RDATA.match(line):
            stream, writer, token = m.groups()
            if token == "batch":
                continue
            value = int(token)
        elif m := _POSITION.match(line):
            stream, writer, prev, _ = m.groups()
            value = int(prev) + 1
        else:
            continue
        writers = first.setdefault(stream, {})
        writers[writer] = min(writers.get(writer, value), value)
    return {s: {w: t - 1 for w, t in ws.items()} for s, ws in first.items()}


# --- one consumer, in its own process -------------------------------------------------------


@attrs.define
class Meter:
    """Counts messages and times the consumer: from the first message read
    (live) or from the end of the publishing (backlog) to the last one.

    A client is not metered per line (that would add a call to each): its
    handler counts rows, and once every row is handled the meter looks at
    the client's own line count, again on each turn of the loop until every
    line is in (rows may wait for fetches in flight; lines may follow the
    last row).  Live, a client's clock starts at its first batch."""

    wanted: int
    live: bool
    done: Callable[[], None] = lambda: None
    count: int = 0
    rows: int = 0
    wanted_rows: int | None = None
    #: A client's line count, and how to look again on the loop's next turn.
    lines: Callable[[], int] | None = None
    soon: Callable[[Callable[[], None]], object] | None = None
    wall: float = 0.0
    cpu: float = 0.0

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def tick(self) -> None:
        self.count += 1
        if self.count == 1 and self.live:
            self.start()
        if self.count == self.wanted:
            self._maybe_finish()

    def handled(self, rows: int) -> None:
        if self.rows == 0 and self.live:
            self.start()
        self.rows += rows
        if self.rows == self.wanted_rows:
            self._lines_in()

    def _lines_in(self) -> None:
        assert self.lines is not None and self.soon is not None
        self.count = self.lines()
        if self.count < self.wanted:
            self.soon(self._lines_in)
        else:
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.count == self.wanted and self.rows == (self.wanted_rows or 0):
            self.wall = time.perf_counter() - self.wall
            self.cpu = time.process_time() - self.cpu
            self.done()


class Child:
    """What a consumer process needs: the traffic, the server, and how to
    publish it (backlog: itself, blocking its loop; live: the parent)."""

    def __init__(self, port: int, repeat: int, mode: str) -> None:
        import redis

        self.port = port
        self.entries = main_channel_entries(repeat)
        self.channel = self.entries[0][0]
        self.live = mode == "live"
        self.meter = Meter(len(self.entries), self.live)
        self._redis = redis.Redis(host="127.0.0.1", port=port, socket_timeout=60)

    def subscribed(self) -> None:
        """Called once the consumer's subscription is confirmed."""
        if self.live:
            print("ready", flush=True)
            return
        publish(self._redis, self.entries)  # nothing is read meanwhile
        self.meter.start()

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            "count": self.meter.count,
            "wall": self.meter.wall,
            "cpu": self.meter.cpu,
            **extra,
        }


def run_bare(child: Child) -> dict[str, Any]:
    import hiredis

    from synrepl._resp import encode_command

    sock = socket.create_connection(("127.0.0.1", child.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = hiredis.Reader()
    sock.sendall(encode_command("SUBSCRIBE", child.channel))
    confirmed = False
    while not confirmed:
        reader.feed(sock.recv(65536))
        while (reply := reader.gets()) is not False:
            confirmed = confirmed or reply[0] == b"subscribe"
    child.subscribed()
    meter = child.meter
    while meter.count < meter.wanted:
        reader.feed(sock.recv(262144))
        while (reply := reader.gets()) is not False:
            if reply[0] == b"message":
                reply[2].decode("utf-8")
                meter.tick()
    sock.close()
    return child.result()


#: Seconds a consumer may take before it is taken for one that lost messages.
TIMEOUT = 120.0


def _in_time(done: Any) -> Any:
    """``done`` (a Deferred or an asyncio future), failing after :data:`TIMEOUT`."""
    if hasattr(done, "addTimeout"):
        from twisted.internet import reactor

        return done.addTimeout(TIMEOUT, reactor)
    import asyncio

    return asyncio.wait_for(done, TIMEOUT)


def _run_reactor(work: Callable[[Any], Any]) -> Any:
    """Run ``work(reactor)`` (a coroutine function) on Twisted's default reactor."""
    from twisted.internet import defer
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    outcome: list[Any] = []

    async def run() -> None:
        try:
            outcome.append(await work(reactor))
        except BaseException as e:  # noqa: BLE001 - raised after the reactor stops
            outcome.append(e)
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()))
    reactor.run()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def run_txredisapi(child: Child) -> dict[str, Any]:
    import txredisapi  # type: ignore[import-untyped]
    from twisted.internet import defer

    async def work(reactor: Any) -> dict[str, Any]:
        done: defer.Deferred[None] = defer.Deferred()
        child.meter.done = lambda: done.callback(None)
        tick = child.meter.tick

        class Counting(txredisapi.SubscriberProtocol):  # type: ignore[misc]
            def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
                tick()

        factory = txredisapi.SubscriberFactory()
        factory.protocol = Counting
        reactor.connectTCP("127.0.0.1", child.port, factory)
        connection = await factory.deferred
        await connection.subscribe(child.channel)
        child.subscribed()
        await _in_time(done)
        connection.disconnect()
        return child.result(hiredis=txredisapi.hiredis is not None)

    return dict(_run_reactor(work))


def run_redis_py(child: Child) -> dict[str, Any]:
    import asyncio

    import redis.asyncio

    async def work() -> dict[str, Any]:
        client = redis.asyncio.Redis(host="127.0.0.1", port=child.port)
        pubsub = client.pubsub()
        await pubsub.subscribe(child.channel)
        while (message := await pubsub.get_message(timeout=5.0)) is None or message[
            "type"
        ] != "subscribe":
            pass
        child.subscribed()
        meter = child.meter
        async for message in pubsub.listen():
            if message["type"] == "message":
                message["data"].decode("utf-8")
                meter.tick()
                if meter.count == meter.wanted:
                    break
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
        return child.result()

    return asyncio.run(work())


def _transport_callbacks(
    child: Child, subscribed: Callable[[], None], work: Callable[[str], object] | None = None
) -> dict[str, Any]:
    tick = child.meter.tick
    on_line: Callable[[str, str], None]
    if work is None:

        def on_line(channel: str, line: str) -> None:
            tick()

    else:

        def on_line(channel: str, line: str) -> None:
            work(line)
            tick()

    return {
        "on_line": on_line,
        "on_subscribed": subscribed,
        "on_connection_lost": lambda: None,
        "publish_enabled": False,
    }


def _floor_work(streams: Sequence[str] | None) -> Callable[[str], object]:
    """What a client does with a line before delivery: the same skip of
    commands nobody handles, the same parser (the client's floor)."""
    from synrepl._client_core import _MOVES_POSITIONS
    from synrepl.commands import COMMAND_TYPES, SelectiveParser, parse_line

    unhandled = frozenset(COMMAND_TYPES) - {"RDATA", "POSITION"}
    parse = parse_line if streams is None else SelectiveParser(streams=streams)

    def work(line: str) -> object:
        if not line.startswith(_MOVES_POSITIONS) and line.partition(" ")[0] in unhandled:
            return None
        return parse(line)

    return work


def run_transport_twisted(
    child: Child, work_per_line: Callable[[str], object] | None = None
) -> dict[str, Any]:
    from twisted.internet import defer

    from synrepl.config import RedisConfig
    from synrepl.connection import TransportOptions
    from synrepl.twisted.redis_transport import RedisTransport

    async def work(reactor: Any) -> dict[str, Any]:
        subscribed: defer.Deferred[None] = defer.Deferred()
        done: defer.Deferred[None] = defer.Deferred()
        child.meter.done = lambda: done.callback(None)
        transport = RedisTransport(
            reactor,
            RedisConfig(enabled=True, host="127.0.0.1", port=child.port),
            [child.channel],
            options=TransportOptions(keepalive_interval=300.0),
            **_transport_callbacks(
                child,
                lambda: None if subscribed.called else subscribed.callback(None),
                work_per_line,
            ),
        )
        transport.start()
        await subscribed
        child.subscribed()
        await _in_time(done)
        await transport.stop()
        return child.result()

    return dict(_run_reactor(work))


def run_transport_asyncio(child: Child) -> dict[str, Any]:
    import asyncio

    from synrepl.asyncio.redis_transport import RedisTransport
    from synrepl.config import RedisConfig
    from synrepl.connection import TransportOptions

    async def work() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        subscribed, done = loop.create_future(), loop.create_future()
        child.meter.done = lambda: done.set_result(None)
        transport = RedisTransport(
            RedisConfig(enabled=True, host="127.0.0.1", port=child.port),
            [child.channel],
            options=TransportOptions(keepalive_interval=300.0),
            **_transport_callbacks(
                child, lambda: None if subscribed.done() else subscribed.set_result(None)
            ),
        )
        transport.start()
        await subscribed
        child.subscribed()
        await _in_time(done)
        await transport.stop()
        return child.result()

    return asyncio.run(work())


@attrs.frozen
class _Page:
    updates: list[tuple[int, Any]]
    upto_token: int
    limited: bool


class _NoHistory:
    """A fetcher answering every page at once, empty (the start positions
    make fetching unnecessary; a fetch would show as a missing row)."""

    async def get_repl_stream_updates(
        self, instance: str, stream: str, from_token: int, upto_token: int
    ) -> _Page:
        return _Page([], upto_token, False)


def _client_options(child: Child, streams: Sequence[str] | None) -> dict[str, Any]:
    from synrepl.config import config_from_dict
    from synrepl.connection import TransportOptions

    start = start_positions(line for _, line in child.entries)
    if streams is not None:
        start = {s: w for s, w in start.items() if s in streams}
    config = config_from_dict(
        {
            "server_name": child.channel,
            "redis": {"enabled": True, "host": "127.0.0.1", "port": child.port},
        }
    )
    return {
        "config": config,
        "streams": streams,
        "start": start,
        "read_only": True,
        "fetcher": _NoHistory(),
        "transport_options": TransportOptions(keepalive_interval=300.0),
    }


def _row_counter(child: Child, streams: Sequence[str] | None) -> Callable[[Any], None]:
    """The no-op handler: it only counts the rows it is given."""
    meter = child.meter
    meter.wanted_rows = expected_rows((line for _, line in child.entries), streams)
    handled = meter.handled

    def handler(batch: Any) -> None:
        handled(len(batch.rows))

    return handler


def _client_result(child: Child, client: Any, streams: Sequence[str] | None) -> dict[str, Any]:
    counters = client.counters
    wanted = child.meter.wanted_rows
    problems = []
    if counters.rows_delivered != wanted:
        problems.append(f"{counters.rows_delivered} rows delivered, not {wanted}")
    for name in ("gaps", "bad_lines", "rows_fetched", "handler_errors"):
        if getattr(counters, name):
            problems.append(f"{name}={getattr(counters, name)}")
    if problems:
        raise RuntimeError("the client lost or repeated rows: " + ", ".join(problems))
    return child.result(rows=counters.rows_delivered)


def _streams_of(name: str) -> list[str] | None:
    return ["events"] if name.endswith("-events") else None


def run_client_twisted(child: Child, streams: Sequence[str] | None) -> dict[str, Any]:
    from twisted.internet import defer

    from synrepl.twisted.client import ReplicationClient

    async def work(reactor: Any) -> dict[str, Any]:
        done: defer.Deferred[None] = defer.Deferred()
        child.meter.done = lambda: done.callback(None)
        child.meter.soon = lambda call: reactor.callLater(0, call)

        class Metered(ReplicationClient):
            def _on_subscribed(self) -> None:
                super()._on_subscribed()
                child.subscribed()

        options = _client_options(child, streams)
        client = Metered(reactor, options.pop("config"), **options)
        client.on_rows(None, _row_counter(child, streams))
        child.meter.lines = lambda: client.counters.lines
        await client.start()
        await _in_time(done)
        await client.stop()
        return _client_result(child, client, streams)

    return dict(_run_reactor(work))


def run_client_asyncio(child: Child, streams: Sequence[str] | None) -> dict[str, Any]:
    import asyncio

    from synrepl.asyncio import ReplicationClient

    async def work() -> dict[str, Any]:
        done = asyncio.get_running_loop().create_future()
        child.meter.done = lambda: done.set_result(None)
        child.meter.soon = asyncio.get_running_loop().call_soon

        class Metered(ReplicationClient):
            def _on_subscribed(self) -> None:
                super()._on_subscribed()
                child.subscribed()

        options = _client_options(child, streams)
        client = Metered(options.pop("config"), **options)
        client.on_rows(None, _row_counter(child, streams))
        child.meter.lines = lambda: client.counters.lines
        await client.start()
        await _in_time(done)
        await client.stop()
        return _client_result(child, client, streams)

    return asyncio.run(work())


def run_consumer(name: str, child: Child) -> dict[str, Any]:
    if name == "bare":
        return run_bare(child)
    if name == "txredisapi":
        return run_txredisapi(child)
    if name == "redis-py":
        return run_redis_py(child)
    if name == "transport-twisted":
        return run_transport_twisted(child)
    if name == "transport-asyncio":
        return run_transport_asyncio(child)
    if name.startswith("floor-"):
        return run_transport_twisted(child, _floor_work(_streams_of(name)))
    if name.startswith("client-twisted-"):
        return run_client_twisted(child, _streams_of(name))
    if name.startswith("client-asyncio-"):
        return run_client_asyncio(child, _streams_of(name))
    raise ValueError(f"no consumer named {name!r}")


def child_main(args: argparse.Namespace) -> int:
    logging.getLogger("synrepl").setLevel(logging.ERROR)  # the corpus's unnamed writer
    child = Child(args.port, args.repeat, args.mode)
    # The harness's own objects (the corpus) out of the collector's way, so
    # that no consumer pays for scanning them.
    gc.collect()
    gc.freeze()
    result = run_consumer(args.consumer, child)
    if result["count"] != len(child.entries):
        raise RuntimeError(f"{result['count']} of {len(child.entries)} messages")
    print(json.dumps(result), flush=True)
    return 0


# --- the parent: rounds, interleaved ----------------------------------------------------------


def run_once(
    name: str, mode: str, server: PrivateRedis, entries: Entries, repeat: int
) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--consumer", name]
    command += ["--port", str(server.port), "--repeat", str(repeat), "--mode", mode]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    if mode == "live":
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name} did not subscribe")
        server.publish(entries)
    output = child.stdout.read()
    if child.wait() != 0:
        raise RuntimeError(f"{name} ({mode}) failed, exit {child.returncode}")
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    result["rate"] = result["count"] / (result["cpu"] if mode == "live" else result["wall"])
    return result


def report(mode: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    medians = {name: statistics.median(r["rate"] for r in rs) for name, rs in runs.items()}
    baseline, ceiling = medians.get(BASELINE), medians.get("bare")
    unit = "msg per CPU second" if mode == "live" else "msg/s"
    print(f"\n{mode}: median {unit} (lowest-highest), ratios of medians")
    print(f"  {'consumer':<24} {'median':>10} {'spread':>21}  {'/txredisapi':>11} {'/bare':>6}")
    for name, rs in runs.items():
        rates = [r["rate"] for r in rs]
        spread = f"{min(rates) / 1e3:,.0f}k-{max(rates) / 1e3:,.0f}k"
        vs_base = f"{medians[name] / baseline:.2f}x" if baseline else "-"
        vs_bare = f"{medians[name] / ceiling:.2f}x" if ceiling else "-"
        print(
            f"  {name:<24} {medians[name] / 1e3:>9,.0f}k {spread:>21}  {vs_base:>11} {vs_bare:>6}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=2, help="copies of the corpus replayed")
    ap.add_argument("--mode", nargs="*", choices=["backlog", "live"], default=["backlog", "live"])
    ap.add_argument("--only", nargs="*", choices=CONSUMERS, help="run only these consumers")
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = ap.parse_args(argv)

    consumers = [c for c in CONSUMERS if not args.only or c in args.only]
    entries = main_channel_entries(args.repeat)
    rows = expected_rows((line for _, line in entries), None)
    print(
        f"{len(entries):,} messages ({rows:,} rows) on {entries[0][0]!r}; "
        f"Python {sys.version.split()[0]}; {args.rounds} rounds, consumers interleaved"
    )
    server = PrivateRedis(args.redis_server)
    try:
        for mode in args.mode:
            runs: dict[str, list[dict[str, Any]]] = {c: [] for c in consumers}
            for _ in range(args.rounds):
                for name in consumers:
                    runs[name].append(run_once(name, mode, server, entries, args.repeat))
            report(mode, runs)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    if "--consumer" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--consumer", required=True)
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--repeat", type=int, required=True)
        ap.add_argument("--mode", required=True)
        raise SystemExit(child_main(ap.parse_args()))
    raise SystemExit(main())
