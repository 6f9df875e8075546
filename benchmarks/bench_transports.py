"""Subscriber throughput: the Redis transports against bare hiredis and redis-py, in one run.

The repository's corpus (both files of corpus/, stream tokens renumbered so
that they keep increasing across the files and across ``--repeat`` copies)
is published into a private redis-server while the subscriber under test is
not reading, so it waits as a backlog in Redis's output buffer and the
socket; then the subscriber drains it, and the time from the first read to
the last line counted is measured.  Every candidate decodes each message as
UTF-8 (what a transport hands up is text):

* ``bare socket + hiredis`` -- a blocking socket, ``hiredis.Reader``, no
  event loop: the ceiling (the baseline of the ratios);
* ``redis.asyncio PubSub`` -- redis-py's asyncio pub/sub, with hiredis,
  read with ``listen()``: what a transport built on it could do at best;
* ``synrepl asyncio`` -- :class:`synrepl.asyncio.redis_transport.RedisTransport`;
* ``synrepl Twisted`` -- :class:`synrepl.twisted.redis_transport.RedisTransport`.

Run: ``python benchmarks/bench_transports.py [--rounds N] [--repeat K]``.
Needs ``redis-server`` on PATH (or ``--redis-server``), hiredis and redis-py.
Reports messages/second, the ratio to the baseline and to redis.asyncio
(best of N rounds).
This is a benchmark, not a test: it asserts nothing about time, only that
every candidate received every message.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hiredis
import redis

from synrepl._resp import encode_command
from synrepl.config import RedisConfig
from synrepl.connection import TransportOptions

CORPUS_FILES = ("replication-corpus.jsonl", "replication-corpus-pg.jsonl")

Entries = list[tuple[str, str]]


# --- the corpus ----------------------------------------------------------------------


def corpus_segments() -> list[Entries]:
    """``(channel, line)`` of each corpus file (``SYNREPL_CORPUS_DIR`` overrides corpus/)."""
    folder = Path(
        os.environ.get("SYNREPL_CORPUS_DIR") or Path(__file__).resolve().parents[1] / "corpus"
    )
    segments = []
    for name in CORPUS_FILES:
        path = folder / name
        opener: Any = open if path.is_file() else gzip.open
        with opener(path if path.is_file() else folder / f"{name}.gz", "rt", encoding="utf-8") as f:
            segments.append([(d["channel"], d["line"]) for d in map(json.loads, f)])
    return segments


_RDATA = re.compile(r"RDATA (\S+) (\S+) (\d+) ")
_POSITION = re.compile(r"POSITION (\S+) (\S+) (\d+) (\d+)$")


def renumbered(segments: Sequence[Entries], repeat: int) -> Entries:
    """The segments, ``repeat`` times over, each stream's tokens shifted past
    the previous segment's so that they keep increasing (the two files come
    from different servers; their tokens would otherwise go backwards)."""
    base: dict[str, int] = {}
    out: Entries = []
    for _ in range(repeat):
        for segment in segments:
            top: dict[str, int] = {}
            out.extend((channel, _shifted(line, base, top)) for channel, line in segment)
            base.update(top)
    return out


def _shifted(line: str, base: dict[str, int], top: dict[str, int]) -> str:
    """``line`` with its stream tokens moved up by ``base``; ``top`` keeps the highest."""

    def shift(stream: str, token: str) -> str:
        new = base.get(stream, 0) + int(token)
        top[stream] = max(top.get(stream, 0), new)
        return str(new)

    if m := _RDATA.match(line):
        stream, instance, token = m.groups()
        return f"RDATA {stream} {instance} {shift(stream, token)} {line[m.end() :]}"
    if m := _POSITION.match(line):
        stream, instance, prev, new = m.groups()
        return f"POSITION {stream} {instance} {shift(stream, prev)} {shift(stream, new)}"
    return line


# --- a private redis-server ----------------------------------------------------------------


class PrivateRedis:
    """A redis-server on a free port with an unlimited pub/sub output buffer,
    so the whole backlog waits for the subscriber."""

    def __init__(self, executable: str) -> None:
        self.directory = tempfile.mkdtemp(prefix="synrepl-bench-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        args = [executable, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", self.directory]
        args += ["--client-output-buffer-limit", "pubsub 0 0 0"]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    @property
    def config(self) -> RedisConfig:
        return RedisConfig(enabled=True, host="127.0.0.1", port=self.port)

    def publish(self, entries: Entries) -> None:
        """PUBLISH every entry (pipelined); each must reach exactly one subscriber."""
        received = 0
        for start in range(0, len(entries), 5000):
            pipe = self.client.pipeline(transaction=False)
            for channel, line in entries[start : start + 5000]:
                pipe.publish(channel, line)
            received += sum(pipe.execute())
        if received != len(entries):
            raise RuntimeError(f"{received} of {len(entries)} messages reached a subscriber")

    def close(self) -> None:
        self.client.close()
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


# --- the candidates ------------------------------------------------------------------------
#
# Each subscribes, has the backlog published while it is not reading, then
# drains it; it returns (seconds, lines counted).


def bare_hiredis(
    server: PrivateRedis, channels: Sequence[str], entries: Entries
) -> tuple[float, int]:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = hiredis.Reader()
    sock.sendall(encode_command("SUBSCRIBE", *channels))
    confirmed = 0
    while confirmed < len(channels):
        reader.feed(sock.recv(65536))
        while (reply := reader.gets()) is not False:
            confirmed += reply[0] == b"subscribe"
    server.publish(entries)
    wanted, count = len(entries), 0
    start = time.perf_counter()
    while count < wanted:
        reader.feed(sock.recv(262144))
        while (reply := reader.gets()) is not False:
            if reply[0] == b"message":
                reply[2].decode("utf-8")
                count += 1
    elapsed = time.perf_counter() - start
    sock.close()
    return elapsed, count


async def redis_py_pubsub(
    server: PrivateRedis, channels: Sequence[str], entries: Entries
) -> tuple[float, int]:
    import redis.asyncio

    client = redis.asyncio.Redis(host="127.0.0.1", port=server.port)
    pubsub = client.pubsub()
    await pubsub.subscribe(*channels)
    confirmed = 0
    while confirmed < len(channels):
        message = await pubsub.get_message(timeout=5.0)
        confirmed += message is not None and message["type"] == "subscribe"
    server.publish(entries)  # blocks the loop: nothing is read meanwhile
    wanted, count = len(entries), 0
    start = time.perf_counter()
    async for message in pubsub.listen():
        if message["type"] == "message":
            message["data"].decode("utf-8")
            count += 1
            if count == wanted:
                break
    elapsed = time.perf_counter() - start
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await client.aclose()
    return elapsed, count


async def synrepl_asyncio(
    server: PrivateRedis, channels: Sequence[str], entries: Entries
) -> tuple[float, int]:
    from synrepl.asyncio.redis_transport import RedisTransport

    loop = asyncio.get_running_loop()
    subscribed, done = loop.create_future(), loop.create_future()
    wanted, count = len(entries), 0

    def on_line(channel: str, line: str) -> None:
        nonlocal count
        count += 1
        if count == wanted:
            done.set_result(None)

    def on_subscribed() -> None:
        if not subscribed.done():
            subscribed.set_result(None)

    transport = RedisTransport(
        server.config,
        channels,
        on_line=on_line,
        on_subscribed=on_subscribed,
        on_connection_lost=lambda: None,
        publish_enabled=False,
        options=TransportOptions(keepalive_interval=300.0),
    )
    transport.start()
    await subscribed
    server.publish(entries)  # blocks the loop: nothing is read meanwhile
    start = time.perf_counter()
    await done
    elapsed = time.perf_counter() - start
    await transport.stop()
    return elapsed, count


def synrepl_twisted(
    server: PrivateRedis, channels: Sequence[str], entries: Entries, rounds: int
) -> list[tuple[float, int]]:
    """All rounds in one reactor run (a reactor cannot be restarted)."""
    from twisted.internet import defer
    from twisted.internet import reactor as _reactor

    from synrepl.twisted.redis_transport import RedisTransport

    reactor: Any = _reactor  # zope interfaces do not type-check

    results: list[tuple[float, int]] = []
    failure: list[BaseException] = []

    async def one_round() -> tuple[float, int]:
        subscribed: defer.Deferred[None] = defer.Deferred()
        done: defer.Deferred[None] = defer.Deferred()
        wanted, count = len(entries), 0

        def on_line(channel: str, line: str) -> None:
            nonlocal count
            count += 1
            if count == wanted:
                done.callback(None)

        def on_subscribed() -> None:
            if not subscribed.called:
                subscribed.callback(None)

        transport = RedisTransport(
            reactor,
            server.config,
            channels,
            on_line=on_line,
            on_subscribed=on_subscribed,
            on_connection_lost=lambda: None,
            publish_enabled=False,
            options=TransportOptions(keepalive_interval=300.0),
        )
        transport.start()
        await subscribed
        server.publish(entries)  # blocks the reactor: nothing is read meanwhile
        start = time.perf_counter()
        await done
        elapsed = time.perf_counter() - start
        await transport.stop()
        return elapsed, count

    async def run_all() -> None:
        try:
            for _ in range(rounds):
                gc.collect()
                results.append(await one_round())
        except BaseException as e:  # noqa: BLE001 - reported after the reactor stops
            failure.append(e)
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run_all()))
    reactor.run()
    if failure:
        raise failure[0]
    return results


# --- the run ----------------------------------------------------------------------------------


def best(results: Sequence[tuple[float, int]], wanted: int, label: str) -> float:
    for _, count in results:
        if count != wanted:
            raise RuntimeError(f"{label} counted {count} lines, not {wanted}")
    return wanted / min(seconds for seconds, _ in results)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=2, help="copies of the corpus in the backlog")
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    ap.add_argument(
        "--only",
        nargs="*",
        choices=["bare", "redis-py", "asyncio", "twisted"],
        help="run only these candidates",
    )
    args = ap.parse_args(argv)
    wanted_candidates = set(args.only or ["bare", "redis-py", "asyncio", "twisted"])

    entries = renumbered(corpus_segments(), args.repeat)
    channels = sorted({channel for channel, _ in entries})
    size = sum(len(line) for _, line in entries)
    from redis.utils import HIREDIS_AVAILABLE

    from synrepl.asyncio.redis_transport import HIREDIS

    print(
        f"{len(entries):,} messages ({size / 1e6:.1f} MB) on {len(channels)} channels; "
        f"Python {sys.version.split()[0]}, hiredis {hiredis.__version__} "
        f"(redis-py uses it: {HIREDIS_AVAILABLE}, synrepl: {HIREDIS}), "
        f"redis-py {redis.__version__}; best of {args.rounds} rounds"
    )
    server = PrivateRedis(args.redis_server)
    try:
        runs: dict[str, Callable[[], tuple[float, int]]] = {}
        if "bare" in wanted_candidates:
            runs["bare socket + hiredis (baseline)"] = lambda: bare_hiredis(
                server, channels, entries
            )
        if "redis-py" in wanted_candidates:
            runs["redis.asyncio PubSub + hiredis"] = lambda: asyncio.run(
                redis_py_pubsub(server, channels, entries)
            )
        if "asyncio" in wanted_candidates:
            runs["synrepl asyncio RedisTransport"] = lambda: asyncio.run(
                synrepl_asyncio(server, channels, entries)
            )
        rates: dict[str, float] = {}
        for label, run in runs.items():
            results = []
            for _ in range(args.rounds):
                gc.collect()
                results.append(run())
            rates[label] = best(results, len(entries), label)
        if "twisted" in wanted_candidates:
            label = "synrepl Twisted RedisTransport"
            twisted = synrepl_twisted(server, channels, entries, args.rounds)
            rates[label] = best(twisted, len(entries), label)
    finally:
        server.close()
    baseline = next(iter(rates.values()))
    redis_py = rates.get("redis.asyncio PubSub + hiredis")
    for label, rate in rates.items():
        versus = f"   {rate / redis_py:5.2f}x redis.asyncio" if redis_py else ""
        print(f"  {label:<36} {rate:>12,.0f} msg/s   {rate / baseline:5.2f}x{versus}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
