"""``synrepl watch``: print the replication channel's commands, decoded, as they come."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from synrepl.cli._errors import EXIT_OK, UsageError
from synrepl.cli._options import (
    add_cluster_options,
    add_filter_options,
    add_output_options,
    cluster_config,
    command_names,
    non_negative_int,
    positive_float,
    split_words,
)
from synrepl.cli._render import Filters, Output, Stats, command_record, make_console, print_summary
from synrepl.cli._render import row_record as _row_record
from synrepl.cli._runtime import (
    Session,
    cli_transport_options,
    connect_redis,
    current_log_setup,
    transport_failure,
)
from synrepl.cli._watcher import LineWatcher, PositionFile
from synrepl.commands import COMMAND_TYPES, PositionCommand, RdataCommand, ReplicateCommand, encode
from synrepl.config import RedisConfig, SynapseConfig
from synrepl.connection import AttemptFailure
from synrepl.positions import GapUnfillable, RowsReceived
from synrepl.twisted.client import ReplicationClient
from synrepl.twisted.redis_transport import RedisTransport

__all__ = ("add_parser", "run", "redis_address")

DESCRIPTION = """\
Print the commands on a Synapse cluster's replication channel, decoded, as they
come: stream rows (RDATA) with their stream, writer, token and fields,
POSITIONs, USER_SYNC, USER_IP (access tokens redacted), and the rest.

watch is read-only: it publishes nothing on Redis (not even REPLICATE)
unless you pass --replicate, and it shows rows from the first line it sees.
With --resume FILE it keeps its position in FILE, and when restarted first
fetches, over HTTP from each writer, exactly the rows it missed.
A summary of what was seen goes to stderr on exit (Ctrl-C).
"""

EPILOG = """\
examples:
  synrepl watch -c /etc/synapse/homeserver.yaml
  synrepl watch -c homeserver.yaml -c workers/generic1.yaml --stream events --json
  synrepl watch --server-name example.com --redis-url redis://:pass@10.0.0.5:6379
  synrepl watch -c homeserver.yaml --command USER_SYNC --command USER_IP
  synrepl watch -c homeserver.yaml --writer event_persister1 --duration 60
  synrepl watch -c homeserver.yaml --resume /var/lib/synrepl/watch.pos --replicate --json

JSON (one object per line): rows are
  {"command": "RDATA", "stream": ..., "writer": ..., "token": ..., "kind": ...,
   "row": {field: value, ...}, "fetched": false, "ts": ...}
with the token the row's batch belongs to and, for the events stream, the
sub-row kind (ev, state, state-all); other commands carry their own fields.

exit status: 0 stopped normally (Ctrl-C, --duration, --count), 1 Redis
unreachable or another runtime failure, 2 bad usage or config.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "watch",
        help="print replication commands live, decoded",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_options(parser, http=True)
    add_filter_options(parser)
    add_output_options(parser)
    group = parser.add_argument_group("behaviour")
    group.add_argument(
        "--replicate",
        action="store_true",
        help="publish REPLICATE on connect, so that every writer answers with its "
        "POSITIONs (watch publishes nothing without it)",
    )
    group.add_argument(
        "--resume",
        metavar="FILE",
        help="keep positions in FILE; when restarted, catch up over HTTP and print "
        "exactly the rows missed meanwhile (POSITION lines are not printed in this mode)",
    )
    group.add_argument(
        "--duration", metavar="SECONDS", type=positive_float, help="stop after this long"
    )
    group.add_argument(
        "--count", metavar="N", type=non_negative_int, help="stop after printing N records"
    )
    parser.set_defaults(run=run)
    return parser


def redis_address(redis: RedisConfig) -> str:
    """Where Redis is, for messages (never with credentials)."""
    if redis.path:
        return f"unix:{redis.path}"
    host = f"[{redis.host}]" if ":" in redis.host else redis.host
    return f"{host}:{redis.port}{' (TLS)' if redis.use_tls else ''}"


def filters_from(args: argparse.Namespace) -> Filters:
    return Filters.of(
        split_words(args.stream), command_names(args.command), split_words(args.writer)
    )


def _printing_session(
    reactor: Any, args: argparse.Namespace, filters: Filters
) -> tuple[Session, Stats, Output, LineWatcher]:
    """The session, counters, output and line printer every watch mode shares."""
    session = Session(reactor, duration=args.duration)
    stats = Stats()
    output = Output(
        json_mode=args.json, color=args.color, on_closed=lambda: session.stop("output closed")
    )
    watcher = LineWatcher(
        output,
        filters,
        stats,
        show_access_tokens=args.show_access_tokens,
        limit=args.count,
        on_limit=lambda: session.stop("count"),
    )
    return session, stats, output, watcher


async def run(reactor: Any, args: argparse.Namespace) -> int:
    config = cluster_config(args, need_redis=True)
    filters = filters_from(args)
    if args.resume:
        return await _run_resumable(reactor, args, config, filters)
    session, stats, _output, watcher = _printing_session(reactor, args, filters)
    transport = await watch_channel(
        reactor,
        config,
        watcher.on_line,
        stats,
        replicate=args.replicate,
        timeout=args.connect_timeout,
    )
    err = make_console(args.color, stderr=True)
    mode = "publishing REPLICATE" if args.replicate else "read-only"
    err.print(
        f"synrepl watch: {config.server_name!r} on Redis {transport.address} ({mode}); "
        "Ctrl-C to stop",
        style="dim",
    )
    if args.count == 0:
        session.stop("count")
    await session.wait()
    await transport.stop()
    watcher.finish()
    print_summary(err, "synrepl watch", stats)
    return EXIT_OK


async def watch_channel(
    reactor: Any,
    config: SynapseConfig,
    on_line: Callable[[str, str], None],
    stats: Stats,
    *,
    replicate: bool,
    timeout: float,
    client_name: str = "synrepl-watch",
) -> RedisTransport:
    """Subscribe (read-only unless ``replicate``); REPLICATE on each (re)connect if asked."""
    holder: list[RedisTransport] = []
    subscriptions = 0

    def send_replicate() -> None:
        if holder:
            d = holder[0].publish(config.server_name, encode(ReplicateCommand()))
            d.addErrback(lambda f: None)

    def on_subscribed() -> None:
        nonlocal subscriptions
        subscriptions += 1
        if subscriptions > 1:
            stats.reconnects += 1
        if replicate:
            send_replicate()

    transport = await connect_redis(
        reactor,
        config,
        on_line=on_line,
        timeout=timeout,
        publish=replicate,
        on_subscribed=on_subscribed,
        client_name=client_name,
    )
    holder.append(transport)
    if replicate:
        send_replicate()
    return transport


async def _run_resumable(
    reactor: Any, args: argparse.Namespace, config: SynapseConfig, filters: Filters
) -> int:
    """``--resume``: the ReplicationClient's bookkeeping, HTTP catch-up and a position file."""
    file = PositionFile(args.resume, config.server_name)
    start = file.load()
    try:
        file.save({})
    except OSError as e:
        raise UsageError(
            f"cannot write the position file '{args.resume}': {e.strerror or e}"
        ) from None
    session, stats, output, watcher = _printing_session(reactor, args, filters)
    started: defer.Deferred[None] | None = None

    def give_up(failure: AttemptFailure) -> None:
        # The first failed attempt is final, as in connect_redis.
        if started is not None and not started.called:
            reactor.callLater(0, started.cancel)

    client = ReplicationClient(
        reactor,
        config,
        instance_name=f"synrepl-watch-{secrets.token_hex(3)}",
        streams=filters.streams,
        start=start,
        read_only=not args.replicate,
        transport_options=cli_transport_options(args.connect_timeout, "synrepl-watch"),
        on_connection_failure=give_up,
    )

    def on_rows(batch: RowsReceived) -> defer.Deferred[None] | None:
        if session.stopping:
            # Leave it unprocessed, so that it is not saved as seen: the next
            # run fetches it again.
            return defer.Deferred()
        stats.saw_rows(batch.stream, batch.writer, len(batch.rows), fetched=batch.fetched)
        if filters.wants_rows(batch.stream, batch.writer):
            for row in batch.rows:  # a whole batch, even past --count
                stats.shown += 1
                output.emit(
                    _row_record(batch.stream, batch.writer, batch.token, row, fetched=batch.fetched)
                )
        if args.count is not None and stats.shown >= args.count:
            session.stop("count")
        return None

    def on_command(cmd: Any) -> None:
        stats.saw_command(cmd)
        if filters.wants(cmd):
            watcher.emit(command_record(cmd, show_access_tokens=args.show_access_tokens))

    def on_gap(gap: GapUnfillable) -> None:
        stats.gaps += 1

    client.on_rows(None, on_rows)
    client.on_gap(on_gap)
    for cls in COMMAND_TYPES.values():
        if cls not in (RdataCommand, PositionCommand):
            client.on_command(cls, on_command)

    setup = current_log_setup()
    setup.quiet_redis = True
    started = client.start()
    timer = reactor.callLater(args.connect_timeout, started.cancel)
    try:
        await started
    except defer.CancelledError:
        await client.stop()
        raise transport_failure(client.transport, args.connect_timeout) from None
    finally:
        if timer.active():
            timer.cancel()
    setup.quiet_redis = False

    err = make_console(args.color, stderr=True)
    how = "from now" if start is None else f"resuming from '{args.resume}'"
    note = (
        ""
        if args.replicate
        else "; catch-up starts at each writer's next POSITION (--replicate asks now)"
    )
    err.print(
        f"synrepl watch: {config.server_name!r} on Redis {redis_address(config.redis)}, {how}"
        f"{note}; Ctrl-C to stop",
        style="dim",
    )

    def save() -> None:
        try:
            file.save(client.positions())
        except OSError as e:
            print(f"synrepl: warning: cannot save positions: {e}", file=sys.stderr)

    saver = LoopingCall(save)
    saver.clock = reactor
    saver.start(1.0, now=False)
    if args.count == 0:
        session.stop("count")
    await session.wait()
    saver.stop()
    await client.stop()
    save()
    stats.lines = client.counters.lines
    stats.bad_lines = client.counters.bad_lines
    stats.unknown_commands = client.counters.unknown_commands
    stats.reconnects = client.counters.reconnects
    print_summary(err, "synrepl watch", stats, [f"positions saved to {args.resume}"])
    return EXIT_OK
