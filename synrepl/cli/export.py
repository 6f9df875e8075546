"""``synrepl export``: the cluster's rows or full events into a streaming system.

A long-running, read-only process: a :class:`~synrepl.twisted.client.ReplicationClient`
(publishing nothing, on Twisted's asyncio reactor, which the sinks' asyncio
libraries need) hands each batch to an :class:`~synrepl.export.Exporter`,
which returns once the sink acknowledged it; only then is the checkpoint
saved.  See ``docs/export.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
from typing import Any

from twisted.internet import defer, threads

from synrepl.checkpoints import CheckpointStore, StoreError, checkpoint_store
from synrepl.cli._errors import EXIT_FAILURE, EXIT_OK, RuntimeFailure, UsageError
from synrepl.cli._options import (
    add_cluster_options,
    add_event_options,
    cluster_config,
    event_filter,
    event_source,
    positive_float,
    split_words,
    wants_full_events,
)
from synrepl.cli._runtime import (
    ClientStart,
    Session,
    cli_transport_options,
)
from synrepl.cli.watch import check_source
from synrepl.config import read_secret_file
from synrepl.deadletters import dead_letter_store
from synrepl.delivery import HandlerFailurePolicy
from synrepl.errors import ConfigError
from synrepl.export import (
    SINK_SCHEMES,
    Exporter,
    Handover,
    HandoverError,
    Partition,
    SinkUnavailable,
    parse_partition,
    sink_from_url,
)
from synrepl.streams import STREAM_NAMES
from synrepl.twisted.client import ReplicationClient

__all__ = ("add_parser", "run")

logger = logging.getLogger("synrepl.export")

#: The checkpoint name of an export without --partition (a handover from it
#: is --previous-partitions 1).
UNPARTITIONED = "export"

DESCRIPTION = """\
Publish each row the cluster writes (the events stream's rows by default,
whole events with --full, any streams with --stream) as one JSON message to
a Redis stream, a NATS JetStream subject or a webhook, in order per writer,
checkpointing only what the sink acknowledged.  Read-only: it never
publishes on the replication channel.  Run several with --partition I/N to
share the work: each room goes to one of them.
"""

EPILOG = (
    """\
sinks (--to):
"""
    + "".join(f"  {scheme}: {what}\n" for scheme, what in SINK_SCHEMES.items())
    + """
examples:
  synrepl export -c homeserver.yaml --full --to redis-stream://127.0.0.1:6379/synapse-events \\
      --checkpoint export.checkpoint
  synrepl export -c homeserver.yaml --full --type m.room.message \\
      --to nats://127.0.0.1:4222/synapse.messages --checkpoint sqlite:export.db
  synrepl export -c homeserver.yaml --full --to https://hooks.example.com/matrix \\
      --webhook-secret-file hook.secret --dead-letters dead.jsonl --checkpoint export.checkpoint
  synrepl export -c homeserver.yaml --full --partition 0/3 --to ... --checkpoint shared.checkpoint

exit status: 0 stopped (Ctrl-C, SIGTERM, --duration); 1 Redis unreachable,
the event source or a store cannot be read, or delivery stopped (a batch the
sink kept refusing, with no --dead-letters); 2 bad usage or config.
"""
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="publish rows or full events to Redis Streams, NATS JetStream or a webhook",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_options(parser, http=True)
    parser.add_argument("--to", metavar="URL", required=True, help="the sink (see below)")
    parser.add_argument(
        "--checkpoint",
        metavar="SPEC",
        help="where positions are kept (PATH, sqlite:PATH or postgresql://...): saved after "
        "the sink acknowledged each batch, resumed from at start; without it the export "
        "starts from now every time",
    )
    parser.add_argument(
        "--dead-letters",
        metavar="SPEC",
        help="keep a batch the sink keeps refusing here (PATH, sqlite:PATH, postgresql://...) "
        "and go on; without it the export stops on such a batch",
    )
    parser.add_argument(
        "--retries",
        metavar="N",
        type=int,
        default=5,
        help="send a batch the sink refused (a webhook's 400, ...) again N times, waiting "
        "from 1 s doubling to 30 s, before dead-lettering it or stopping (default: 5); a "
        "sink that is down is waited for without limit",
    )
    parser.add_argument(
        "-s",
        "--stream",
        metavar="STREAM",
        action="append",
        default=[],
        help="export these streams' rows (repeatable or comma-separated; default: events)",
    )
    add_event_options(parser)
    group = parser.add_argument_group("partitions")
    group.add_argument(
        "--partition",
        metavar="I/N",
        help="export only partition I of N (0-based): the rooms (or --partition-key values) "
        "that hash to I, as Synapse spreads rooms over event persisters",
    )
    group.add_argument(
        "--partition-key",
        metavar="FIELD",
        default="room_id",
        help="the message (or row) field partitions split on (default: room_id); messages "
        "without it split on their writer",
    )
    group.add_argument(
        "--previous-partitions",
        metavar="N",
        type=int,
        help="the export ran as N partitions before: start from their common checkpoint "
        "(in the same --checkpoint store) and skip what they exported",
    )
    parser.add_argument(
        "--webhook-secret-file",
        metavar="FILE",
        help="sign each webhook request with the secret in FILE (HMAC-SHA256)",
    )
    parser.add_argument(
        "--max-pending-rows",
        metavar="N",
        type=int,
        default=10_000,
        help="rows kept in memory per stream while the sink is slow or down; the rest are "
        "fetched from the writers later (default: 10000)",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics (the client's and the export's) here",
    )
    parser.add_argument(
        "--duration", metavar="SECONDS", type=positive_float, help="stop after this long"
    )
    parser.set_defaults(run=run)
    return parser


def _streams(args: argparse.Namespace, full: bool) -> list[str]:
    streams = split_words(args.stream) or ["events"]
    unknown = [s for s in streams if s not in STREAM_NAMES]
    if unknown:
        raise UsageError(
            f"unknown stream {unknown[0]!r} (streams: {', '.join(sorted(STREAM_NAMES))})"
        )
    if full and "events" not in streams:
        streams.append("events")
    return streams


def _partition(
    args: argparse.Namespace, store_spec: str | None, server_name: str
) -> Partition | None:
    previous: int | None = args.previous_partitions
    if args.partition is None:
        if previous is not None:
            raise UsageError("--previous-partitions goes with --partition I/N")
        return None
    try:
        index, count = parse_partition(args.partition)
    except ValueError as e:
        raise UsageError(f"--partition: {e}") from None
    if previous is None:
        return Partition(index, count)
    if previous < 1:
        raise UsageError(f"--previous-partitions must be at least 1, got {previous}")
    if store_spec is None:
        raise UsageError("--previous-partitions reads the old partitions' --checkpoint store")
    old = []
    for i in range(previous):
        name = Partition(i, previous).name
        positions = _load(store_spec, server_name, name)
        if positions is None and previous == 1:  # an export that ran without --partition
            name = UNPARTITIONED
            positions = _load(store_spec, server_name, name)
        if positions is None:
            raise UsageError(
                f"--previous-partitions {previous}: the checkpoint store has no {name}; "
                "hand over from the partition count the export last ran with"
            )
        old.append(positions)
    try:
        return Partition(index, count, Handover(old))
    except HandoverError as e:
        raise UsageError(f"--previous-partitions: {e}") from None


def _load(store_spec: str, server_name: str, name: str) -> dict[str, dict[str, int]] | None:
    store = checkpoint_store(store_spec, server_name=server_name, name=name)
    try:
        return store.load()
    except StoreError as e:
        raise RuntimeFailure(f"cannot read the checkpoint of {name}: {e}") from None
    finally:
        store.close()


def _secret(args: argparse.Namespace) -> bytes | None:
    if args.webhook_secret_file is None:
        return None
    try:
        text = read_secret_file(args.webhook_secret_file)
    except ConfigError as e:
        raise UsageError(f"--webhook-secret-file: {e.message}") from None
    if not text:
        raise UsageError(f"--webhook-secret-file: '{args.webhook_secret_file}' is empty")
    return text.encode()


def _awaited(coroutine: Any) -> defer.Deferred[Any]:
    return defer.Deferred.fromFuture(asyncio.ensure_future(coroutine))


async def run(reactor: Any, args: argparse.Namespace) -> int:
    if not hasattr(reactor, "_asyncioEventloop"):
        raise UsageError(
            "synrepl export runs on Twisted's asyncio reactor (run it as `synrepl export`)"
        )
    config = cluster_config(args, need_redis=True)
    full = wants_full_events(args)
    streams = _streams(args, full)
    try:
        sink = sink_from_url(args.to, secret=_secret(args))
    except ValueError as e:
        raise UsageError(f"--to: {e}") from None
    except ImportError as e:
        raise UsageError(
            f"--to {args.to.split(':')[0]}: {e.name} is missing: pip install 'synrepl[export]'"
        ) from None
    if args.retries < 0:
        raise UsageError("--retries must be 0 or more")
    if args.max_pending_rows < 1:
        raise UsageError("--max-pending-rows must be at least 1")
    partition = _partition(args, args.checkpoint, config.server_name)
    filter = event_filter(args)
    source = event_source(args)
    store: CheckpointStore | None = None
    if args.checkpoint is not None:
        store = checkpoint_store(
            args.checkpoint,
            server_name=config.server_name,
            name=partition.name if partition is not None else UNPARTITIONED,
        )
        await _start_from_handover(store, partition)
    dead = (
        dead_letter_store(args.dead_letters, server_name=config.server_name, name="export")
        if args.dead_letters
        else None
    )
    if source is not None:
        await check_source(source)
    exporter = Exporter(
        sink, server_name=config.server_name, partition=partition, key_field=args.partition_key
    )
    try:
        await _awaited(exporter.open())
    except SinkUnavailable as e:  # waited for, not fatal: the sink may come up later
        logger.warning("sink %s not reachable yet (%s); batches wait for it", sink.target, e)
    starting = ClientStart(reactor, args.connect_timeout)

    client = ReplicationClient(
        reactor,
        config,
        instance_name=f"synrepl-export-{secrets.token_hex(3)}",
        streams=streams,
        read_only=True,
        checkpoint=store,
        dead_letters=dead,
        failure_policy=HandlerFailurePolicy(
            retries=args.retries, then="dead_letter" if dead is not None else "stop"
        ),
        seed_from=source,
        max_pending_rows=args.max_pending_rows,
        transport_options=cli_transport_options(args.connect_timeout, "synrepl-export"),
        on_connection_failure=starting.attempt_failed,
    )
    if full:
        assert source is not None
        exporter.follow_events(client, source=source, filter=filter)
    for stream in streams:
        if not (full and stream == "events"):
            exporter.follow_rows(client, stream, filter=filter)
    session = Session(reactor, duration=args.duration)
    listener = _serve_metrics(reactor, args.metrics_listen, client, exporter)
    await starting.start(client, session)
    what = "full events" if full else "rows"
    share = f", partition {partition.index}/{partition.count}" if partition is not None else ""
    print(
        f"synrepl export: {what} of {', '.join(streams)} to {sink.target}{share}; "
        f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'from now (no --checkpoint)'}",
        file=sys.stderr,
        flush=True,
    )
    await session.wait()
    # Together: the client hands out nothing more, a send under way finishes
    # (and is checkpointed), one waiting for a sink that is down gives up.
    client_stopped = client.stop()
    await _awaited(exporter.close())
    await client_stopped
    if listener is not None:
        await listener.stopListening()
    if source is not None:
        await threads.deferToThread(source.close)
    stats = exporter.stats
    print(
        f"synrepl export: {stats.messages} messages in {stats.batches} sends to {sink.target}"
        f" ({stats.skipped} left to other partitions, {stats.sink_failures} failed attempts)",
        file=sys.stderr,
        flush=True,
    )
    if starting.stopped_because is not None:
        raise RuntimeFailure(f"delivery stopped: {starting.stopped_because}")
    return EXIT_OK if session.reason != "failed" else EXIT_FAILURE


async def _start_from_handover(store: CheckpointStore, partition: Partition | None) -> None:
    """A new partition of a changed count starts from the old ones' common checkpoint."""
    if partition is None or partition.handover is None:
        return
    try:
        if await threads.deferToThread(store.load) is None:
            await threads.deferToThread(store.save, partition.handover.start())
    except StoreError as e:
        raise RuntimeFailure(f"cannot start {partition.name} from the handover: {e}") from None


def _serve_metrics(reactor: Any, listen: str | None, client: Any, exporter: Exporter) -> Any:
    if listen is None:
        return None
    from prometheus_client import CollectorRegistry

    from synrepl.cli.exporter import serve_metrics
    from synrepl.prometheus import ClientCollector, ExporterCollector

    registry = CollectorRegistry()
    registry.register(ClientCollector([client]))
    registry.register(ExporterCollector(exporter))
    return serve_metrics(reactor, registry, listen)
