"""``synrepl watch``: print the replication channel's commands, decoded, as they come.

Two ways of running:

- the line printer (:class:`~synrepl.cli._watcher.LineWatcher`): every line
  decoded as it comes, rows shown from the very first one, POSITIONs too;
- the ReplicationClient (``--resume FILE`` and/or ``--full``): the library's
  bookkeeping, so rows come once each, in order, and with ``--resume`` FILE
  is its checkpoint store, saved after each handled batch; ``--full`` hands
  the events stream to ``on_events``, which reads each event's content from
  an event source (Synapse's database or the admin API).

Both are read-only unless ``--replicate``.  Read-only, the client connects
each writer from its own traffic (its first row or POSITION), and ``--full``
seeds "from now" positions from the database before any writer speaks.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer, threads

from synrepl.cli._errors import EXIT_OK, RuntimeFailure, UsageError
from synrepl.cli._options import (
    add_cluster_options,
    add_event_options,
    add_filter_options,
    add_output_options,
    cluster_config,
    command_names,
    event_filter,
    event_source,
    non_negative_int,
    positive_float,
    split_words,
    wants_full_events,
)
from synrepl.cli._render import (
    Filters,
    Output,
    Stats,
    command_record,
    event_record,
    make_console,
    print_summary,
)
from synrepl.cli._render import row_record as _row_record
from synrepl.cli._runtime import (
    ClientStart,
    Session,
    cli_transport_options,
    connect_redis,
)
from synrepl.cli._watcher import LineWatcher, PositionFile
from synrepl.commands import COMMAND_TYPES, PositionCommand, RdataCommand, ReplicateCommand, encode
from synrepl.config import RedisConfig, SynapseConfig
from synrepl.events import (
    AdminApiEventSource,
    EventSource,
    EventSourceError,
    EventsReceived,
    PostgresEventSource,
    SqliteEventSource,
)
from synrepl.positions import GapUnfillable, RowsReceived
from synrepl.twisted.client import NotReadyError, ReplicationClient
from synrepl.twisted.redis_transport import RedisTransport

__all__ = ("add_parser", "run", "redis_address")

DESCRIPTION = """\
Print the commands on a Synapse cluster's replication channel, decoded, as they
come: stream rows (RDATA) with their stream, writer, token and fields,
POSITIONs, USER_SYNC, USER_IP (access tokens redacted), and the rest.

watch is read-only: it publishes nothing on Redis (not even REPLICATE)
unless you pass --replicate, and it shows rows from the first line it sees.
With --resume FILE it keeps its position in FILE, saved after each batch it
printed, and when restarted fetches, over HTTP from each writer, exactly the
rows it missed: read-only, at the latest when that writer next writes.

--room and --type filter the events stream on its rows; --full (implied by
--sender) prints whole events instead, with sender and content, read-only
from Synapse's database (as homeserver.yaml says, or --database) or from
the admin API (--admin-url, --admin-token-file).
A summary of what was seen goes to stderr on exit (Ctrl-C).
"""

EPILOG = """\
examples:
  synrepl watch -c /etc/synapse/homeserver.yaml
  synrepl watch -c homeserver.yaml -c workers/generic1.yaml --stream events --json
  synrepl watch --server-name example.com --redis-url redis://:pass@10.0.0.5:6379
  synrepl watch -c homeserver.yaml --command USER_SYNC --command USER_IP
  synrepl watch -c homeserver.yaml --writer event_persister1 --duration 60
  synrepl watch -c homeserver.yaml --room '!abc:example.com' --type 'm.room.*'
  synrepl watch -c homeserver.yaml --full --sender @alice:example.com
  synrepl watch -c homeserver.yaml --full --database 'host=db dbname=synapse user=observer'
  synrepl watch -c homeserver.yaml --full --admin-url http://127.0.0.1:8008 \\
      --admin-token-file /etc/synrepl/admin.token
  synrepl watch -c homeserver.yaml --resume /var/lib/synrepl/watch.pos --json
  synrepl watch -c homeserver.yaml --resume watch.pos --full --type m.room.message

JSON (one object per line): rows are
  {"command": "RDATA", "stream": ..., "writer": ..., "token": ..., "kind": ...,
   "row": {field: value, ...}, "fetched": false, "ts": ...}
with the token the row's batch belongs to and, for the events stream, the
sub-row kind (ev, state, state-all); with --full, events are
  {"command": "EVENT", "stream": "events", "writer": ..., "token": ...,
   "event": {"event_id", "room_id", "type", "sender", "state_key", "content",
   "origin_server_ts", "unsigned", "redacts", "room_version", "rejected",
   "rejection_reason", "outlier", "redacted", "redacted_by"},
   "missing": null, "fetched": false, "ts": ...}
("event" null and "missing": {"event_id", "room_id", "type", "reason"} for
an event the source had no content for); other commands carry their own
fields.

exit status: 0 stopped normally (Ctrl-C, --duration, --count), 1 Redis or the
event source unreachable, or another runtime failure, 2 bad usage or config.
"""

#: The event ID asked for at start, to check that the event source answers.
_PROBE_EVENT_ID = "$synrepl-watch-probe"

#: Seconds a stop waits for a batch still with the handlers (a content fetch).
_DRAIN_TIMEOUT = 2.0


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
    add_event_options(parser)
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
        help="keep positions in FILE, saved after each batch printed; when restarted, "
        "catch up over HTTP and print exactly the rows missed meanwhile, each writer's "
        "at the latest when it next writes (POSITION lines are not printed in this mode)",
    )
    group.add_argument(
        "--silent-after",
        metavar="SECONDS",
        type=positive_float,
        default=30.0,
        help="with --resume: name the writers that still have no position after this "
        "long (default: 30)",
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
    """The filters of the command line.  Any event option (``--room``,
    ``--type``, ``--sender``, ``--full``) shows only the events stream unless
    ``--stream`` names streams itself."""
    streams = split_words(args.stream)
    events = event_filter(args)
    about_events = events is not None or wants_full_events(args)
    if not streams and about_events:
        streams = ["events"]
    elif about_events and "events" not in streams:
        raise UsageError(
            "--room, --type, --sender and --full are about the events stream, which "
            "--stream leaves out; add events to --stream"
        )
    return Filters.of(streams, command_names(args.command), split_words(args.writer), events=events)


def _printing_session(
    reactor: Any, args: argparse.Namespace, filters: Filters
) -> tuple[Session, Stats, Output, LineWatcher]:
    """The session, counters, output and line printer every watch mode shares."""
    session = Session(reactor, duration=args.duration)
    stats = Stats()
    output = Output(
        json_mode=args.json,
        color=args.color,
        on_closed=lambda: session.stop("output closed"),
        reactor=reactor,  # into a pipe, lines wait for the input that was ready to be handled
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
    source = event_source(args, timeout=args.connect_timeout)
    if args.resume or source is not None:
        return await _run_client(reactor, args, config, filters, source)
    session, stats, output, watcher = _printing_session(reactor, args, filters)
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
    output.flush()
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


def describe_source(source: EventSource) -> str:
    """Where events are read from, for messages (never with a secret)."""
    if isinstance(source, SqliteEventSource):
        return f"SQLite '{source.path}'"
    if isinstance(source, PostgresEventSource):
        return f"PostgreSQL {repr(source).removeprefix('PostgresEventSource(').rstrip(')')}"
    if isinstance(source, AdminApiEventSource):
        return f"the admin API at {source.base_url}"
    return repr(source)


async def check_source(source: EventSource) -> None:
    """Ask the source for one (unknown) event, so that a database or an admin
    API that cannot be read is one error line at start, not a retry for ever.

    Raises:
        RuntimeFailure: the source is down, refuses, or is not Synapse's.
    """
    try:
        await threads.deferToThread(source.fetch, [_PROBE_EVENT_ID])
    except EventSourceError as e:
        reason = str(e).removeprefix(f"{source!r}: ")  # the source is named already
        raise RuntimeFailure(
            f"cannot read events from {describe_source(source)}: {reason}"
        ) from None


def silent_text(silent: Mapping[str, list[str]], limit: int = 8) -> str:
    """``events: persister2; typing: master``, at most ``limit`` streams."""
    parts = [f"{stream}: {', '.join(writers)}" for stream, writers in sorted(silent.items())]
    if len(parts) > limit:
        parts = [*parts[:limit], f"and {len(parts) - limit} more streams"]
    return "; ".join(parts)


class _Checkpoint:
    """What ``--resume``'s FILE holds, learnt from its saves: fires waiters once
    a save includes every writer that had a position when they asked."""

    def __init__(self, reactor: Any, file: PositionFile) -> None:
        self._reactor = reactor
        self.saved: dict[str, dict[str, int]] = {}
        self._waiters: list[tuple[dict[str, dict[str, int]], defer.Deferred[None]]] = []
        file.on_saved = self._in_thread

    def _in_thread(self, positions: dict[str, dict[str, int]]) -> None:
        self._reactor.callFromThread(self._saved, positions)

    def _saved(self, positions: dict[str, dict[str, int]]) -> None:
        self.saved = positions
        waiting, self._waiters = self._waiters, []
        for wanted, waiter in waiting:
            if self._covers(wanted):
                waiter.callback(None)
            else:
                self._waiters.append((wanted, waiter))

    def _covers(self, wanted: Mapping[str, Mapping[str, int]]) -> bool:
        return all(
            writer in self.saved.get(stream, {})
            for stream, writers in wanted.items()
            for writer in writers
        )

    def includes(self, wanted: dict[str, dict[str, int]]) -> defer.Deferred[None]:
        """Fires once a save holds a position for every pair of ``wanted``."""
        if self._covers(wanted):
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((wanted, waiter))
        return waiter


async def _report_readiness(
    client: ReplicationClient,
    checkpoint: _Checkpoint,
    err: Any,
    path: str,
    silent_after: float,
    replicate: bool,
) -> None:
    """Say on stderr once every expected writer has a position and FILE holds
    them all, and name the writers still silent after ``silent_after`` s."""
    try:
        await client.wait_ready(silent_after)
    except NotReadyError as e:
        why = (
            "they did not answer REPLICATE: are they subscribed to this Redis?"
            if replicate
            else "read-only, watch starts each writer at its own first row or POSITION; "
            "--replicate asks every writer now"
        )
        err.print(
            f"synrepl watch: no position yet, after {silent_after:g} s, from "
            f"{silent_text(e.silent)} ({why}); until they have one, a restart may miss "
            "what they write meanwhile",
            style="yellow",
        )
        await client.wait_ready()
    await checkpoint.includes(client.positions())
    err.print(
        f"synrepl watch: ready: every writer has a position, saved in '{path}' "
        "(a restart goes on from there)",
        style="dim",
    )


async def _run_client(
    reactor: Any,
    args: argparse.Namespace,
    config: SynapseConfig,
    filters: Filters,
    source: EventSource | None,
) -> int:
    """``--resume`` and ``--full``: the ReplicationClient, with FILE as its
    checkpoint store and the event source for ``on_events``."""
    try:
        return await _client_session(reactor, args, config, filters, source)
    finally:
        if source is not None:
            await threads.deferToThread(source.close)


async def _client_session(
    reactor: Any,
    args: argparse.Namespace,
    config: SynapseConfig,
    filters: Filters,
    source: EventSource | None,
) -> int:
    file: PositionFile | None = None
    start: dict[str, dict[str, int]] | None = None
    if args.resume:
        file = PositionFile(args.resume, config.server_name)
        start = file.load()
        try:
            file.save({})  # an unwritable path fails now, before anything is printed
        except OSError as e:
            raise UsageError(
                f"cannot write the position file '{args.resume}': {e.strerror or e}"
            ) from None
    checkpoint = _Checkpoint(reactor, file) if file is not None else None
    if source is not None:
        await check_source(source)
    session, stats, output, watcher = _printing_session(reactor, args, filters)
    starting = ClientStart(reactor, args.connect_timeout)

    client = ReplicationClient(
        reactor,
        config,
        instance_name=f"synrepl-watch-{secrets.token_hex(3)}",
        streams=filters.streams,
        checkpoint=file,
        read_only=not args.replicate,
        transport_options=cli_transport_options(args.connect_timeout, "synrepl-watch"),
        on_connection_failure=starting.attempt_failed,
        seed_from=source,
        silent_after=None,  # watch names silent writers itself (--silent-after)
    )
    full = source is not None

    # No batch reaches a handler once the session stops: the stop below
    # begins synchronously (it resumes from session.stop), and a stopping
    # client hands out nothing more; what was not handled is not saved as
    # seen, so the next run fetches it again.  A batch that could not be
    # printed whole (stdout closed under it) fails, which a stopping client
    # takes as "not handled"; with FILE, the batch is flushed first, so that
    # what is saved as seen has reached stdout's reader.
    def printed(batch: RowsReceived | EventsReceived) -> defer.Deferred[None] | None:
        if file is not None:
            output.flush()
        if output.closed:
            return defer.fail(RuntimeFailure(f"output closed during {batch.stream}"))
        if args.count is not None and stats.shown >= args.count:
            session.stop("count")
        return None

    def on_rows(batch: RowsReceived) -> defer.Deferred[None] | None:
        stats.saw_rows(batch.stream, batch.writer, len(batch.rows), fetched=batch.fetched)
        if full and batch.stream == "events":
            return None  # printed whole, by on_events
        if filters.wants_rows(batch.stream, batch.writer):
            for row in batch.rows:  # a whole batch, even past --count
                if filters.wants_row(batch.stream, row):
                    stats.shown += 1
                    output.emit(
                        _row_record(
                            batch.stream, batch.writer, batch.token, row, fetched=batch.fetched
                        )
                    )
        return printed(batch)

    def on_events(batch: EventsReceived) -> defer.Deferred[None] | None:
        if filters.wants_rows(batch.stream, batch.writer):
            for event in batch.events:  # a whole batch, even past --count
                stats.shown += 1
                output.emit(
                    event_record(
                        batch.stream, batch.writer, batch.token, event, fetched=batch.fetched
                    )
                )
        return printed(batch)

    def on_command(cmd: Any) -> None:
        stats.saw_command(cmd)
        if filters.wants(cmd):
            watcher.emit(command_record(cmd, show_access_tokens=args.show_access_tokens))

    def on_gap(gap: GapUnfillable) -> None:
        stats.gaps += 1

    if source is not None:
        client.on_events(on_events, source=source, filter=filters.events)
    client.on_rows(None, on_rows)
    client.on_gap(on_gap)
    for cls in COMMAND_TYPES.values():
        if cls not in (RdataCommand, PositionCommand):
            client.on_command(cls, on_command)
    await starting.start(client, session)

    err = make_console(args.color, stderr=True)
    mode = "publishing REPLICATE" if args.replicate else "read-only"
    if file is None:
        how = "from now"
    elif start:
        how = f"resuming from '{args.resume}'"
        if not args.replicate:
            how += (
                ": each writer's missed rows are fetched at the latest when it next "
                "writes (--replicate asks every writer at once)"
            )
    else:
        how = f"from now, positions kept in '{args.resume}'"
    content = f"; events read from {describe_source(source)}" if source is not None else ""
    err.print(
        f"synrepl watch: {config.server_name!r} on Redis {redis_address(config.redis)} "
        f"({mode}), {how}{content}; Ctrl-C to stop",
        style="dim",
    )
    if file is not None and checkpoint is not None:
        readiness = defer.ensureDeferred(
            _report_readiness(
                client, checkpoint, err, args.resume, args.silent_after, args.replicate
            )
        )
        readiness.addErrback(lambda f: None)  # a stop leaves it waiting: nothing to say
    if args.count == 0:
        session.stop("count")
    await session.wait()
    await client.stop(drain_timeout=_DRAIN_TIMEOUT)
    output.flush()
    counters = client.counters
    stats.lines = counters.lines
    stats.bad_lines = counters.bad_lines
    stats.unknown_commands = counters.unknown_commands
    stats.reconnects = counters.reconnects
    extra: list[str] = []
    if source is not None:
        extra.append(f"{counters.events_fetched:,} events read")
        if counters.events_missing:
            extra.append(f"{counters.events_missing:,} without content")
    if file is not None:
        extra.append(f"positions saved to {args.resume}")
    print_summary(err, "synrepl watch", stats, extra)
    if starting.stopped_because is not None:
        raise RuntimeFailure(f"stopped: {starting.stopped_because}")
    return EXIT_OK
