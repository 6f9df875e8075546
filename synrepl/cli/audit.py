"""``synrepl audit``: did every row the writers wrote come on the channel?"""

from __future__ import annotations

import argparse
import json
from typing import Any

import attrs
from rich import box
from rich.table import Table
from rich.text import Text

from synrepl.audit import ChannelRecord, LostRow, RangeCheck, WatchedRange, check_range
from synrepl.cli._errors import EXIT_FAILURE, EXIT_FLAGGED, EXIT_OK, RuntimeFailure
from synrepl.cli._http import HistoryUnavailable, ProbeClient, history_pages, instance_releases
from synrepl.cli._options import (
    add_cluster_options,
    add_request_options,
    cluster_config,
    positive_float,
    split_words,
)
from synrepl.cli._render import make_console, stream_order
from synrepl.cli._runtime import Session, connect_redis, sleep
from synrepl.cli.positions import expected_writers
from synrepl.commands import Command, RdataCommand, ReplicateCommand, encode, parse_line
from synrepl.config import SynapseConfig
from synrepl.errors import MalformedRowError, ProtocolError
from synrepl.streams import AnyRow, RawRow, parse_row

__all__ = ("add_parser", "run", "Audit", "watch", "check")

DESCRIPTION = """\
Watch the cluster's replication channel for a window, then fetch the same
token ranges from each writer's HTTP history (get_repl_stream_updates, what
the writer persisted) and compare: every row the history holds must have come
on the channel as RDATA.  Reports each row a writer wrote but never published
(stream, writer, token, row), each POSITION that stepped over written rows,
and each stream whose history has rows in the window when none came.

The audit publishes one REPLICATE when it starts and one when the window
ends, as every Synapse worker does when it connects: the writers' answering
POSITIONs give exact start and end tokens, quiet streams included.  With
--no-replicate it publishes nothing, and each (stream, writer) is audited
from the first token it sends.  After the window, --grace seconds more are
given to rows still on their way.  Ctrl-C ends the window early.
"""

EPILOG = """\
examples:
  synrepl audit -c /etc/synapse/homeserver.yaml --window 60
  synrepl audit -c homeserver.yaml -s events -s to_device --json
  synrepl audit -c homeserver.yaml --no-replicate --window 300

exit status: 0 nothing was lost; 3 rows were lost (listed); 1 Redis or a
writer's HTTP replication could not be reached, so part of the window could
not be checked (and nothing was found lost in the rest); 2 bad usage or config.
"""

#: How long the writers get to answer the closing REPLICATE.
ANSWER_TIME = 1.0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "audit",
        help="compare the channel with the writers' histories: rows never published",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_options(parser, http=True)
    parser.add_argument(
        "--window",
        metavar="SECONDS",
        type=positive_float,
        default=30.0,
        help="how long to watch the channel (default: 30)",
    )
    parser.add_argument(
        "--grace",
        metavar="SECONDS",
        type=positive_float,
        default=3.0,
        help="how long rows of the window may still arrive after it (default: 3)",
    )
    parser.add_argument(
        "--no-replicate",
        action="store_true",
        help="publish nothing; audit each stream from the first token its writer sends",
    )
    parser.add_argument(
        "-s", "--stream", metavar="STREAM", action="append", default=[], help="only these streams"
    )
    add_request_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour the report"
    )
    parser.set_defaults(run=run)
    return parser


@attrs.frozen
class Unchecked:
    """A range whose history could not be fetched, and why."""

    range: WatchedRange
    problem: str


@attrs.define
class Audit:
    """What the window watched, and what the histories said of it."""

    server_name: str
    window: float
    checks: list[RangeCheck] = attrs.Factory(list)
    unchecked: list[Unchecked] = attrs.Factory(list)
    #: Ranges in which the writer's token did not move: nothing to check.
    quiet: list[WatchedRange] = attrs.Factory(list)
    #: (stream, writer) pairs the config names that sent nothing at all.
    unheard: list[tuple[str, str]] = attrs.Factory(list)
    #: RDATA and POSITION lines that did not parse.  An RDATA whose row does
    #: not type is still compared (raw); one that does not parse at all may
    #: show as a lost row.
    bad_lines: int = 0
    #: Subscriptions after the first one (each splits the window).
    resubscriptions: int = 0

    @property
    def lost(self) -> list[LostRow]:
        return [row for c in self.checks for row in c.lost]

    def exit_status(self) -> int:
        if self.lost:
            return EXIT_FLAGGED
        return EXIT_FAILURE if self.unchecked else EXIT_OK

    def skipping_positions(self) -> list[dict[str, Any]]:
        """Each POSITION that stepped over written rows, with the rows' tokens."""
        grouped: dict[tuple[str, str, int, int], list[int]] = {}
        for row in self.lost:
            if row.skipped_by is not None:
                key = (row.stream, row.writer, *row.skipped_by)
                grouped.setdefault(key, []).append(row.token)
        return [
            {"stream": s, "writer": w, "prev": p, "new": n, "tokens": sorted(set(tokens))}
            for (s, w, p, n), tokens in grouped.items()
        ]

    def silent(self) -> list[RangeCheck]:
        return [c for c in self.checks if c.silent]

    def as_json(self) -> dict[str, Any]:
        return {
            "server_name": self.server_name,
            "window": self.window,
            "ok": not self.lost and not self.unchecked,
            "ranges": [
                _range_json(c.range) | {"rows_in_history": c.rows_in_history, "lost": len(c.lost)}
                for c in self.checks
            ],
            "lost": [_lost_json(row) for row in self.lost],
            "skipping_positions": self.skipping_positions(),
            "silent": [
                _range_json(c.range) | {"rows_in_history": c.rows_in_history} for c in self.silent()
            ],
            "unchecked": [_range_json(u.range) | {"problem": u.problem} for u in self.unchecked],
            "quiet": [_range_json(r) for r in self.quiet],
            "unheard": [{"stream": s, "writer": w} for s, w in self.unheard],
            "bad_lines": self.bad_lines,
            "resubscriptions": self.resubscriptions,
        }


def _range_json(rng: WatchedRange) -> dict[str, Any]:
    return {
        "stream": rng.stream,
        "writer": rng.writer,
        "after": rng.after,
        "upto": rng.upto,
        "rows_on_channel": rng.rows_seen,
    }


def _lost_json(row: LostRow) -> dict[str, Any]:
    skipped = None if row.skipped_by is None else list(row.skipped_by)
    return {
        "stream": row.stream,
        "writer": row.writer,
        "token": row.token,
        "row": row.row.as_dict(),
        "skipped_by_position": skipped,
    }


async def watch(
    reactor: Any,
    config: SynapseConfig,
    *,
    window: float,
    grace: float,
    replicate: bool,
    streams: list[str] | None,
    timeout: float,
) -> tuple[ChannelRecord, Audit]:
    """Record the channel for ``window`` seconds (or until Ctrl-C), then
    ``grace`` seconds more for rows of the window still on their way."""
    record = ChannelRecord(streams)
    audit = Audit(config.server_name, window)
    holder: list[Any] = []

    def send_replicate() -> None:
        if replicate and holder:
            holder[0].publish(config.server_name, encode(ReplicateCommand())).addErrback(
                lambda f: None
            )

    def on_subscribed() -> None:
        if holder:
            audit.resubscriptions += 1
        record.subscribed()
        send_replicate()

    def on_line(channel: str, line: str) -> None:
        try:
            cmd: Command = parse_line(line)
        except MalformedRowError:  # the row is kept raw, as its history's is
            audit.bad_lines += 1
            cmd = _raw_rdata(line)
        except ProtocolError:
            if line.startswith(("RDATA ", "POSITION ")):
                audit.bad_lines += 1
            return
        record.command(cmd)

    transport = await connect_redis(
        reactor,
        config,
        on_line=on_line,
        timeout=timeout,
        publish=replicate,
        channels=[config.server_name],
        on_subscribed=on_subscribed,
        client_name="synrepl-audit",
    )
    holder.append(transport)
    send_replicate()
    started = reactor.seconds()
    await Session(reactor, duration=window).wait()
    audit.window = round(reactor.seconds() - started, 1)  # shorter when interrupted
    if replicate:
        send_replicate()
        await sleep(reactor, ANSWER_TIME)
    record.freeze()
    await sleep(reactor, grace)
    await transport.stop()
    return record, audit


def _raw_rdata(line: str) -> RdataCommand:
    """An RDATA whose row does not type, with the row as it came (its JSON
    parsed, or parse_line would have said the command was malformed)."""
    _, stream, instance, token, row_json = line.split(" ", 4)
    row = RawRow(stream, json.loads(row_json))
    return RdataCommand(stream, instance, None if token == "batch" else int(token), row)


async def check(
    reactor: Any,
    config: SynapseConfig,
    record: ChannelRecord,
    audit: Audit,
    *,
    timeout: float,
    retries: int,
) -> Audit:
    """Fetch each watched range from its writer's history and compare."""
    probe = ProbeClient(reactor, config, timeout=timeout, retries=retries)
    try:
        for rng in sorted(record.ranges(), key=_range_order):
            if rng.upto <= rng.after:
                audit.quiet.append(rng)
                continue
            try:
                history = await _history(probe, config, rng)
            except HistoryUnavailable as e:
                audit.unchecked.append(Unchecked(rng, e.problem))
                continue
            audit.checks.append(check_range(rng, history))
    finally:
        await probe.http.close()
    return audit


def _range_order(rng: WatchedRange) -> tuple[tuple[int, str], str, int]:
    """Synapse's stream order, then writer and token."""
    return stream_order(rng.stream), rng.writer, rng.after


async def _history(
    probe: ProbeClient, config: SynapseConfig, rng: WatchedRange
) -> list[tuple[int, AnyRow]]:
    """Every row of ``rng`` in the writer's history (a row that does not
    parse is kept raw: it is compared all the same)."""
    rows: list[tuple[int, AnyRow]] = []
    async for page in history_pages(probe, config, rng.writer, rng.stream, rng.after, rng.upto):
        for token, raw in page.updates:
            try:
                row = parse_row(rng.stream, raw)
            except MalformedRowError:
                row = RawRow(rng.stream, raw)
            rows.append((int(token), row))
    return rows


async def run(reactor: Any, args: argparse.Namespace) -> int:
    config = cluster_config(args, need_redis=True)
    streams = split_words(args.stream) or None
    err = make_console(args.color, stderr=True)
    if not args.json:
        err.print(
            f"watching {config.server_name!r} for {args.window:g} s "
            f"({'read-only' if args.no_replicate else 'REPLICATE at start and end'}); "
            "Ctrl-C ends the window early",
            style="dim",
        )
    record, audit = await watch(
        reactor,
        config,
        window=args.window,
        grace=args.grace,
        replicate=not args.no_replicate,
        streams=streams,
        timeout=args.connect_timeout,
    )
    if not record.ranges():
        raise RuntimeFailure(
            f"nothing heard on channel {config.server_name!r} in {args.window:g} s: no writer "
            "sent a row or a POSITION (is server_name the processes' own? do they use this "
            "Redis, with redis.enabled: true?)"
        )
    heard = record.heard()
    audit.unheard = [
        (stream, writer)
        for stream, writers in expected_writers(
            config, streams, await instance_releases(reactor, config, args.timeout)
        ).items()
        for writer in writers
        if (stream, writer) not in heard
    ]
    await check(reactor, config, record, audit, timeout=args.timeout, retries=args.retries)
    if args.json:
        print(json.dumps(audit.as_json()))
    else:
        _print_report(audit, args.color)
    return audit.exit_status()


def _print_report(audit: Audit, color: str) -> None:
    console = make_console(color)
    table = Table(
        title=f"audit of {audit.server_name} ({audit.window:g} s window)",
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
    )
    for name in ("stream", "writer", "tokens", "on channel", "in history", "lost"):
        table.add_column(name, justify="left" if name in ("stream", "writer") else "right")
    for c in audit.checks:
        rng = c.range
        lost = Text(f"{len(c.lost):,}", style="bold red" if c.lost else "green")
        table.add_row(
            Text(rng.stream, style="cyan"),
            rng.writer,
            f"({rng.after:,}, {rng.upto:,}]",
            f"{rng.rows_seen:,}",
            f"{c.rows_in_history:,}",
            lost,
        )
    for u in audit.unchecked:
        rng = u.range
        table.add_row(
            Text(rng.stream, style="cyan"),
            rng.writer,
            f"({rng.after:,}, {rng.upto:,}]",
            f"{rng.rows_seen:,}",
            Text("?", style="yellow"),
            Text("not checked", style="yellow"),
        )
    console.print(table)
    if audit.quiet:
        pairs = sorted({f"{r.stream}/{r.writer}" for r in audit.quiet})
        console.print(Text(f"quiet (token did not move): {', '.join(pairs)}", style="dim"))
    for row in audit.lost:
        how = (
            "never published as RDATA"
            if row.skipped_by is None
            else f"stepped over by POSITION {row.skipped_by[0]} -> {row.skipped_by[1]}"
        )
        fields = json.dumps(row.row.as_dict(), ensure_ascii=False)
        console.print(
            Text(
                f"✗ lost: {row.stream} {row.writer} token {row.token}: {how}: {fields}",
                style="bold red",
            )
        )
    for p in audit.skipping_positions():
        tokens = ", ".join(str(t) for t in p["tokens"])
        console.print(
            Text(
                f"✗ POSITION {p['stream']} {p['writer']} {p['prev']} -> {p['new']} said nothing "
                f"was written, but the history holds rows at {tokens}",
                style="bold red",
            )
        )
    for c in audit.silent():
        rng = c.range
        console.print(
            Text(
                f"✗ silent: {rng.stream} from {rng.writer}: the history holds "
                f"{c.rows_in_history:,} row(s) in ({rng.after:,}, {rng.upto:,}] and none came "
                "on the channel",
                style="bold red",
            )
        )
    for u in audit.unchecked:
        rng = u.range
        console.print(
            Text(f"! not checked: {rng.stream} from {rng.writer}: {u.problem}", style="yellow")
        )
    for stream, writer in audit.unheard:
        console.print(
            Text(
                f"! unheard: {writer} sent nothing for {stream}, although the config makes it a "
                "writer of it (not audited)",
                style="yellow",
            )
        )
    if audit.bad_lines:
        console.print(
            Text(
                f"! {audit.bad_lines:,} RDATA/POSITION line(s) did not parse "
                "(rows that did not type were compared as they came)",
                style="yellow",
            )
        )
    if audit.resubscriptions:
        console.print(
            Text(
                f"! the Redis subscription was lost {audit.resubscriptions} time(s): what was "
                "published meanwhile was not audited",
                style="yellow",
            )
        )
    if not audit.lost and not audit.unchecked:
        total = sum(c.rows_in_history for c in audit.checks)
        console.print(
            Text(
                f"✓ nothing lost: all {total:,} rows in the writers' histories came as RDATA",
                style="green",
            )
        )
