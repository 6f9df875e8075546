"""What a queued row costs: a handler that holds its first batch while 200,000 more arrive (a benchmark).

    python benchmarks/bench_memory.py [--rows 200000] [--stream events]

The corpus's RDATA lines of one stream (tokens renumbered into one rising
sequence, as many copies as needed) are published into a private
redis-server to a read-only asyncio ReplicationClient whose handler does
not finish its first batch until every line has been received, so every
other row waits in the client's queue (the bound is raised above the row
count, so none is refused).  Printed: the rows queued, the mean wire line,
the Python heap those rows hold (tracemalloc: the traced memory with the
queue full, less the traced memory before the first line), that per queued
row and as a multiple of the wire line, and the process's peak RSS.  The
queue is then released and every row checked to have reached the handler,
in order.  No figure here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import re
import resource
import shutil
import sys
import tracemalloc
from typing import Any

from _replay import PrivateRedis, corpus_segments
from bench_e2e import _NoHistory

from synrepl.config import config_from_dict
from synrepl.connection import TransportOptions

_RDATA = re.compile(r"RDATA (\S+) (\S+) (\d+) (.*)$")


def stream_lines(stream: str, count: int) -> list[str]:
    """``count`` single-row RDATA lines of ``stream`` from the corpus, tokens 1, 2, ..."""
    rows = [
        m.group(4)
        for segment in corpus_segments()
        for _, line in segment
        if (m := _RDATA.match(line)) and m.group(1) == stream
    ]
    if not rows:
        raise SystemExit(f"the corpus has no numbered RDATA of {stream!r}")
    return [f"RDATA {stream} master {n + 1} {rows[n % len(rows)]}" for n in range(count)]


async def measure(server: PrivateRedis, stream: str, lines: list[str]) -> dict[str, Any]:
    from synrepl.asyncio import ReplicationClient

    channel = "memory.bench"
    config = config_from_dict(
        {
            "server_name": channel,
            "redis": {"enabled": True, "host": "127.0.0.1", "port": server.port},
        }
    )
    loop = asyncio.get_running_loop()
    release = loop.create_future()
    tokens: list[int] = []

    async def handler(batch: Any) -> None:
        tokens.append(batch.token)
        if len(tokens) == 1:
            await release  # holds the first batch: the rest queues up

    client = ReplicationClient(
        config,
        streams=[stream],
        start={stream: {"master": 0}},
        read_only=True,
        fetcher=_NoHistory(),
        max_pending_rows=len(lines) * 2,
        transport_options=TransportOptions(keepalive_interval=300.0),
    )
    client.on_rows(stream, handler)
    await client.start()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    # A POSITION first, as Synapse's REPLICATE answer would be: a read-only
    # client connects the writer there, and takes token 1 live.
    entries = [(channel, f"POSITION {stream} master 0 0"), *((channel, line) for line in lines)]
    server.publish(entries)
    del entries
    while client.counters.lines <= len(lines):
        await asyncio.sleep(0.05)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    queued = client.pending_rows(stream)
    tracemalloc.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    release.set_result(None)
    while len(tokens) < len(lines):
        await asyncio.sleep(0.05)
    await client.stop()
    if tokens != list(range(1, len(lines) + 1)):
        raise RuntimeError("rows were lost, repeated or reordered")
    return {"queued": queued, "held": held, "peak_rss": peak_rss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--stream", default="events")
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = ap.parse_args(argv)
    logging.getLogger("synrepl").setLevel(logging.ERROR)
    lines = stream_lines(args.stream, args.rows)
    wire = sum(len(line.encode()) for line in lines) / len(lines)
    server = PrivateRedis(args.redis_server)
    try:
        result = asyncio.run(measure(server, args.stream, lines))
    finally:
        server.close()
    per_row = result["held"] / result["queued"]
    print(
        f"{args.rows:,} {args.stream} rows, Python {sys.version.split()[0]}\n"
        f"  queued behind the held batch   {result['queued']:>12,}\n"
        f"  mean wire line                 {wire:>12,.0f} bytes\n"
        f"  heap held by the queue         {result['held'] / 2**20:>12,.1f} MiB\n"
        f"  per queued row                 {per_row:>12,.0f} bytes ({per_row / wire:.1f}x the line)\n"
        f"  peak RSS                       {result['peak_rss'] / 2**20:>12,.0f} MiB\n"
        f"  every row handled once, in order: yes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
