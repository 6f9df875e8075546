"""``synrepl.export`` into Redis Streams against raw XADD from the same process (a benchmark).

    python benchmarks/bench_export.py [--events 20000] [--rounds 3]
                                      [--redis-url redis://127.0.0.1:6379]

The events rows of the repository's corpus (the ``ev`` rows, as many copies
as needed, one row per token: what the client hands an exporter on a
cluster that writes one event at a time) go into a Redis stream five ways,
each into a key of its own on the Redis at ``--redis-url``:

* ``xadd-awaited`` -- redis.asyncio, one message at a time, each awaited,
  doing what the sink does per batch of one: a ``MULTI``/``EXEC`` pipeline
  with one ``XADD key MAXLEN ~ 1000000 * data JSON id ID``; the messages
  are encoded beforehand.  **The baseline of the ratios**;
* ``xadd-pipelined`` -- the same XADDs pipelined 1,000 at a time, without
  ``MULTI``: what Redis and redis-py can take from one connection, for
  reference;
* ``exporter`` -- an :class:`~synrepl.export.Exporter` with a
  :class:`~synrepl.export.redis_stream.RedisStreamSink`, handed each
  token's ``RowsReceived`` (``export_rows``) and awaited, as the client
  does: building the messages (ids, JSON) included;
* ``end-to-end`` -- the asyncio ``ReplicationClient`` (read-only) following
  a simulated homeserver (``AsyncioHomeserver``, publishing on the same
  Redis from the same process) with the exporter attached
  (``follow_rows``); timed from the first event written until the exporter
  has every one acknowledged, so the homeserver's publishing, the
  client's reading and its refetches over HTTP (in process) are in it;
* ``end-to-end-noop`` -- the same client with a no-op handler instead of
  the exporter, for reference: the most the end-to-end line can reach.

Rounds are interleaved (every case once per round, the order rotated);
printed are the median rate (events per second of wall time), the spread
and the ratio of medians to ``xadd-awaited``.  Every case checks that the
key holds exactly the events, in order, with their ids; the keys
(``synrepl-bench-export-<random>-...``) are deleted at the end.  No figure
here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import statistics
import sys
import time
from collections.abc import Sequence

import redis
import redis.asyncio
from _replay import corpus_segments

import synrepl
from synrepl.export import Exporter, ExportMessage, messages_of_rows
from synrepl.export.redis_stream import DEFAULT_MAXLEN, RedisStreamSink
from synrepl.positions import RowsReceived
from synrepl.streams import EventRow

#: The cases in the order of the first round (the baseline first).
CASES = ("xadd-awaited", "xadd-pipelined", "exporter", "end-to-end", "end-to-end-noop")

#: The server_name of the messages (and, with a random suffix, the homeserver's channel).
SERVER_NAME = "bench.export"

#: Seconds an end-to-end case may take before it counts as stuck.
_TIMEOUT = 300.0

#: What every case is given: the encoded messages, the batches, their rows.
Work = tuple[list[ExportMessage], list[RowsReceived], list[EventRow]]


def corpus_event_rows() -> list[EventRow]:
    """The corpus's events ``ev`` rows, in order."""
    rows = []
    for segment in corpus_segments():
        for _, line in segment:
            if line.startswith("RDATA events "):
                row = synrepl.parse_line(line).row  # type: ignore[union-attr]
                if isinstance(row, EventRow):
                    rows.append(row)
    if not rows:
        raise SystemExit("the corpus has no events rows")
    return rows


def batches_of(rows: Sequence[EventRow], count: int) -> list[RowsReceived]:
    """``count`` batches of one row each, tokens 1, 2, ... from writer ``master``."""
    return [
        RowsReceived("events", "master", n + 1, (rows[n % len(rows)],), False) for n in range(count)
    ]


def encoded(batches: Sequence[RowsReceived]) -> list[ExportMessage]:
    """The messages the exporter makes of ``batches`` (for the raw cases)."""
    return [m for batch in batches for m in messages_of_rows(SERVER_NAME, batch)]


# --- the cases ------------------------------------------------------------------------------


async def xadd_awaited(url: str, key: str, messages: Sequence[ExportMessage]) -> float:
    r = redis.asyncio.Redis.from_url(url)
    try:
        await r.ping()
        started = time.perf_counter()
        for message in messages:
            pipe = r.pipeline(transaction=True)
            pipe.xadd(
                key,
                {"data": message.data, "id": message.id},
                maxlen=DEFAULT_MAXLEN,
                approximate=True,
            )
            await pipe.execute()
        return time.perf_counter() - started
    finally:
        await r.aclose()


async def xadd_pipelined(url: str, key: str, messages: Sequence[ExportMessage]) -> float:
    r = redis.asyncio.Redis.from_url(url)
    try:
        await r.ping()
        started = time.perf_counter()
        for at in range(0, len(messages), 1000):
            pipe = r.pipeline(transaction=False)
            for message in messages[at : at + 1000]:
                pipe.xadd(
                    key,
                    {"data": message.data, "id": message.id},
                    maxlen=DEFAULT_MAXLEN,
                    approximate=True,
                )
            await pipe.execute()
        return time.perf_counter() - started
    finally:
        await r.aclose()


async def exporter_direct(url: str, key: str, batches: Sequence[RowsReceived]) -> float:
    exporter = Exporter(RedisStreamSink(url, key), server_name=SERVER_NAME)
    try:
        await exporter.sink.open()
        started = time.perf_counter()
        for batch in batches:
            await exporter.export_rows(batch)
        return time.perf_counter() - started
    finally:
        await exporter.close()


async def end_to_end(
    url: str, key: str, rows: Sequence[EventRow], *, noop: bool
) -> tuple[float, int]:
    """The asyncio client following a simulated homeserver, the exporter
    attached (or a no-op handler): the seconds, and the rows fetched over HTTP."""
    from synrepl.asyncio import ReplicationClient
    from synrepl.connection import TransportOptions
    from synrepl.testing.asyncio_homeserver import AsyncioHomeserver

    parts = redis.asyncio.ConnectionPool.from_url(url).connection_kwargs
    hs = AsyncioHomeserver(
        server_name=f"{SERVER_NAME}.{secrets.token_hex(4)}",
        redis_host=parts.get("host", "127.0.0.1"),
        redis_port=parts.get("port", 6379),
    )
    await hs.start()
    client = ReplicationClient(
        hs.config(),
        streams={"events"},
        start={"events": {"master": 0}},
        read_only=True,
        fetcher=hs.fetcher(),
        transport_options=TransportOptions(keepalive_interval=300.0),
    )
    # The messages name SERVER_NAME (not the channel's random name): the same as the other cases.
    exporter = Exporter(RedisStreamSink(url, key), server_name=SERVER_NAME)
    handled = 0

    def count(batch: RowsReceived) -> None:
        nonlocal handled
        handled += len(batch.rows)

    def done() -> int:
        return handled if noop else exporter.stats.messages

    if noop:
        client.on_rows("events", count)
    else:
        exporter.follow_rows(client, "events")
    try:
        await client.start()
        await exporter.sink.open()
        started = time.perf_counter()
        deadline = time.monotonic() + _TIMEOUT
        for at in range(0, len(rows), 200):
            for row in rows[at : at + 200]:
                hs.write("events", [row])
            await asyncio.sleep(0)  # let the client read while the homeserver writes
        while done() < len(rows):
            if time.monotonic() > deadline:
                raise RuntimeError(f"end to end: {done()} of {len(rows)} after {_TIMEOUT} s")
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - started
        if done() != len(rows):
            raise RuntimeError(f"end to end: {done()} rows handled, not {len(rows)}")
        return elapsed, client.metrics().stream("events").rows_fetched
    finally:
        await exporter.close()
        await client.stop()
        await hs.stop()


# --- checks and the table -------------------------------------------------------------------


def check(url: str, key: str, messages: Sequence[ExportMessage]) -> None:
    """``key`` holds exactly ``messages``, in order, each with its id beside its JSON."""
    r = redis.Redis.from_url(url)
    try:
        got: list[tuple[bytes, bytes]] = []
        after = "-"
        while page := r.xrange(key, min=after, count=10_000):
            got.extend((fields[b"id"], fields[b"data"]) for _, fields in page)
            after = "(" + page[-1][0].decode()
        want = [(m.id.encode(), m.data) for m in messages]
        if got != want:
            raise RuntimeError(f"{key}: {len(got)} entries, not the {len(want)} messages in order")
    finally:
        r.close()


async def timed(case: str, args: argparse.Namespace, key: str, work: Work) -> tuple[float, int]:
    """Seconds the case took for ``work``, and the rows it fetched over HTTP."""
    messages, batches, rows = work
    if case == "xadd-awaited":
        return await xadd_awaited(args.redis_url, key, messages), 0
    if case == "xadd-pipelined":
        return await xadd_pipelined(args.redis_url, key, messages), 0
    if case == "exporter":
        return await exporter_direct(args.redis_url, key, batches), 0
    return await end_to_end(args.redis_url, key, rows, noop=case == "end-to-end-noop")


def run(args: argparse.Namespace) -> tuple[dict[str, list[float]], list[int]]:
    """Every case once per round, the order rotated: the rates, and the
    rows the end-to-end exporter runs fetched over HTTP."""
    batches = batches_of(corpus_event_rows(), args.events)
    work: Work = (encoded(batches), batches, [batch.rows[0] for batch in batches])
    prefix = f"synrepl-bench-export-{secrets.token_hex(4)}"
    sync = redis.Redis.from_url(args.redis_url)
    keys: list[str] = []
    rates: dict[str, list[float]] = {case: [] for case in CASES}
    fetched: list[int] = []
    try:
        for round_ in range(args.rounds):
            turn = round_ % len(CASES)
            for case in CASES[turn:] + CASES[:turn]:
                key = f"{prefix}-{case}-{round_}"
                keys.append(key)
                seconds, refetched = asyncio.run(timed(case, args, key, work))
                if case == "end-to-end":
                    fetched.append(refetched)
                if case != "end-to-end-noop":  # the no-op handler writes nothing
                    check(args.redis_url, key, work[0])
                sync.delete(key)
                rates[case].append(args.events / seconds)
                print(f"  round {round_ + 1}: {case:<16} {args.events / seconds:>10,.0f}/s")
    finally:
        if keys:
            sync.delete(*keys)
        sync.close()
    return rates, fetched


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000, help="events per case (default 20000)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379",
        help="the Redis to write to (default redis://127.0.0.1:6379)",
    )
    args = ap.parse_args(argv)
    if args.events < 1 or args.rounds < 1:
        ap.error("--events and --rounds must be at least 1")
    logging.basicConfig(level=logging.ERROR)
    print(
        f"{args.events:,} events rows, one a token, {args.rounds} rounds, "
        f"Python {sys.version.split()[0]}, redis-py {redis.__version__}"
    )
    rates, fetched = run(args)
    base = statistics.median(rates["xadd-awaited"])
    print(f"\n{'case':<18} {'median/s':>10} {'spread':>19} {'vs xadd-awaited':>16}")
    for case in CASES:
        median = statistics.median(rates[case])
        spread = f"{min(rates[case]):,.0f}-{max(rates[case]):,.0f}"
        print(f"{case:<18} {median:>10,.0f} {spread:>19} {median / base:>15.2f}x")
    print(
        f"\nrows the end-to-end exporter fetched over HTTP, per round: "
        f"{', '.join(map(str, fetched))}\n"
        "every case wrote exactly the events, in order, with their ids"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
