"""End to end: the ReplicationClient of each adapter draining a backlog (a benchmark).

    python benchmarks/bench_clients.py [--rounds 5] [--repeat 2]

The repository's corpus (tokens renumbered, see bench_transports.py) is
published into a private redis-server while the subscriber does not read;
then the client drains it: every line parsed, positions kept, every batch
handed to a no-op handler, all streams.  Read-only, so each writer connects
at its first RDATA (its first token fetched from a stub that answers at
once).  Printed beside the bare transport of the same adapter, as ratios
from the same run; no figure here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from bench_transports import (
    Entries,
    PrivateRedis,
    best,
    corpus_segments,
    renumbered,
    synrepl_asyncio,
    synrepl_twisted,
)

from synrepl.config import SynapseConfig, config_from_dict
from synrepl.connection import TransportOptions

_OPTIONS = TransportOptions(keepalive_interval=300.0)


@attrs.frozen
class _Page:
    updates: list[tuple[int, Any]]
    upto_token: int
    limited: bool


class _NoHistory:
    """A fetcher that answers every page at once, empty."""

    async def get_repl_stream_updates(
        self, instance: str, stream: str, from_token: int, upto_token: int
    ) -> _Page:
        return _Page([], upto_token, False)


def _config(server: PrivateRedis, channel: str) -> SynapseConfig:
    return config_from_dict(
        {
            "server_name": channel,
            "redis": {"enabled": True, "host": "127.0.0.1", "port": server.config.port},
        }
    )


async def asyncio_client(server: PrivateRedis, channel: str, entries: Entries) -> tuple[float, int]:
    from synrepl.asyncio import ReplicationClient

    wanted = len(entries)
    done = asyncio.get_running_loop().create_future()

    class Counting(ReplicationClient):
        def _line_received(self, channel: str, line: str) -> None:
            super()._line_received(channel, line)
            if self._totals.lines == wanted and not done.done():
                done.set_result(None)

    client = Counting(
        _config(server, channel), read_only=True, fetcher=_NoHistory(), transport_options=_OPTIONS
    )
    client.on_rows(None, lambda batch: None)
    await client.start()
    server.publish(entries)
    start = time.perf_counter()
    await done
    elapsed = time.perf_counter() - start
    await client.stop()
    return elapsed, client.counters.lines


def twisted_client(
    server: PrivateRedis, channel: str, entries: Entries, rounds: int
) -> list[tuple[float, int]]:
    """All rounds in one reactor run (a reactor cannot be restarted)."""
    from twisted.internet import defer
    from twisted.internet import reactor as _reactor

    from synrepl.twisted.client import ReplicationClient

    reactor: Any = _reactor
    results: list[tuple[float, int]] = []
    failure: list[BaseException] = []
    wanted = len(entries)

    async def one_round() -> tuple[float, int]:
        done: defer.Deferred[None] = defer.Deferred()

        class Counting(ReplicationClient):
            def _line_received(self, channel: str, line: str) -> None:
                super()._line_received(channel, line)
                if self._totals.lines == wanted and not done.called:
                    done.callback(None)

        client = Counting(
            reactor,
            _config(server, channel),
            read_only=True,
            fetcher=_NoHistory(),
            transport_options=_OPTIONS,
        )
        client.on_rows(None, lambda batch: None)
        await client.start()
        server.publish(entries)
        start = time.perf_counter()
        await done
        elapsed = time.perf_counter() - start
        await client.stop()
        return elapsed, client.counters.lines

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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=2, help="copies of the corpus in the backlog")
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = ap.parse_args(argv)
    # The main channel only: what a client subscribes to (USER_IP is not).
    entries = [e for e in renumbered(corpus_segments(), args.repeat) if "/" not in e[0]]
    channel = entries[0][0]
    print(
        f"{len(entries):,} messages on {channel!r}; Python {sys.version.split()[0]}; "
        f"best of {args.rounds} rounds"
    )
    server = PrivateRedis(args.redis_server)
    try:
        runs: dict[str, Callable[[], tuple[float, int]]] = {
            "asyncio RedisTransport (lines counted)": lambda: asyncio.run(
                synrepl_asyncio(server, [channel], entries)
            ),
            "asyncio ReplicationClient (no-op handler)": lambda: asyncio.run(
                asyncio_client(server, channel, entries)
            ),
        }
        rates: dict[str, float] = {}
        for label, run in runs.items():
            results = []
            for _ in range(args.rounds):
                gc.collect()
                results.append(run())
            rates[label] = best(results, len(entries), label)
        label = "Twisted RedisTransport (lines counted)"
        rates[label] = best(
            synrepl_twisted(server, [channel], entries, args.rounds), len(entries), label
        )
    finally:
        server.close()
    for label, rate in rates.items():
        print(f"  {label:<44} {rate:>10,.0f} msg/s")
    # A reactor runs once per process: the Twisted client gets a process of its own.
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--twisted-client",
            "--rounds",
            str(args.rounds),
            "--repeat",
            str(args.repeat),
            "--redis-server",
            args.redis_server,
        ],
        check=True,
    )
    transport = rates["asyncio RedisTransport (lines counted)"]
    client = rates["asyncio ReplicationClient (no-op handler)"]
    print(f"  asyncio client / its transport: {client / transport:.2f}x")
    return 0


def twisted_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--twisted-client", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = ap.parse_args(argv)
    entries = [e for e in renumbered(corpus_segments(), args.repeat) if "/" not in e[0]]
    channel = entries[0][0]
    server = PrivateRedis(args.redis_server)
    try:
        rate = best(twisted_client(server, channel, entries, args.rounds), len(entries), "twisted")
    finally:
        server.close()
    print(f"  {'Twisted ReplicationClient (no-op handler)':<44} {rate:>10,.0f} msg/s")
    return 0


if __name__ == "__main__":
    logging.getLogger("synrepl").setLevel(logging.ERROR)  # the corpus's unnamed writer
    if "--twisted-client" in sys.argv:
        raise SystemExit(twisted_main(sys.argv[1:]))
    raise SystemExit(main())
