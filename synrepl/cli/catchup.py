"""``synrepl catchup``: fetch a range of a writer's stream over HTTP and print it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from synrepl.cli._errors import EXIT_OK, RuntimeFailure, UsageError
from synrepl.cli._http import HistoryUnavailable, ProbeClient, describe_location, history_pages
from synrepl.cli._options import (
    add_cluster_options,
    add_output_options,
    add_request_options,
    non_negative_int,
)
from synrepl.cli._options import cluster_config as _cluster_config
from synrepl.cli._render import Output, Stats, error_record, make_console, print_summary, row_record
from synrepl.cli._runtime import Session
from synrepl.errors import ConfigError, MalformedRowError
from synrepl.http import StreamUpdates
from synrepl.sharding import canonical_instance_name
from synrepl.streams import parse_row

__all__ = ("add_parser", "run")

DESCRIPTION = """\
Fetch the rows a writer wrote to a stream between two tokens
(--from A < token <= --to B) over HTTP replication (get_repl_stream_updates,
the endpoint workers catch up with), page by page, and print them like
`synrepl watch` does.  A progress bar shows on stderr for long ranges when the
rows go to a file or a pipe.

Typing and other in-memory streams keep only recent history in the writer;
asking for older rows gives fewer of them.
"""

EPILOG = """\
examples:
  synrepl catchup events --writer event_persister1 --from 1200 --to 1300 -c homeserver.yaml
  synrepl catchup receipts --writer master --from 0 --to 50000 -c homeserver.yaml --json > rows.jsonl
  synrepl catchup typing --writer master --from 10 --to 20 \\
      --instance master=http://127.0.0.1:9093 --secret-file /etc/synapse/replication.secret

exit status: 0 the range was printed; 1 the writer could not be reached or
refused the secret; 2 bad usage or config (an unknown writer, --to not above --from).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "catchup",
        help="fetch a token range of a stream over HTTP and print it",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stream", metavar="STREAM", help="the stream (events, receipts, ...)")
    parser.add_argument(
        "--writer", metavar="INSTANCE", required=True, help="the instance that wrote the rows"
    )
    parser.add_argument(
        "--from",
        dest="from_token",
        metavar="A",
        type=non_negative_int,
        required=True,
        help="start after this token",
    )
    parser.add_argument(
        "--to",
        dest="to_token",
        metavar="B",
        type=non_negative_int,
        required=True,
        help="end at this token (included)",
    )
    add_cluster_options(parser, redis=False, http=True)
    add_output_options(parser, tokens=False)
    add_request_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    parser.set_defaults(run=run)
    return parser


async def run(reactor: Any, args: argparse.Namespace) -> int:
    if args.to_token <= args.from_token:
        raise UsageError(f"--to ({args.to_token}) must be above --from ({args.from_token})")
    config = _cluster_config(args, need_redis=False, need_server_name=False)
    writer = canonical_instance_name(args.writer)
    try:
        location = describe_location(config.location_of(writer))
    except ConfigError:
        known = ", ".join(sorted(config.instance_map)) or "none"
        raise UsageError(
            f"writer {writer!r} is not in instance_map (known: {known}); add it to the "
            f"config, or pass --instance {writer}=http://host:port"
        ) from None
    session = Session(reactor)
    stats = Stats()
    output = Output(
        json_mode=args.json, color=args.color, on_closed=lambda: session.stop("output closed")
    )
    probe = ProbeClient(reactor, config, timeout=args.timeout, retries=args.retries)
    total = args.to_token - args.from_token
    show_bar = (
        not args.no_progress and sys.stderr.isatty() and not sys.stdout.isatty() and total > 1
    )
    err = make_console(args.color, stderr=True)
    progress = Progress(
        TextColumn(f"{args.stream} from {writer}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rows]:,} rows"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        auto_refresh=False,
        disable=not show_bar,
    )

    def show_page(page: StreamUpdates) -> None:
        for token, raw in page.updates:
            stats.lines += 1
            try:
                row = parse_row(args.stream, raw)
            except MalformedRowError as e:
                stats.bad_lines += 1
                output.emit(error_record(e, args.stream))
                continue
            stats.saw_rows(args.stream, writer, 1)
            stats.shown += 1
            output.emit(row_record(args.stream, writer, int(token), row, fetched=True))

    pages = 0
    with progress:
        bar = progress.add_task("catchup", total=total, rows=0)
        try:
            async for page in history_pages(
                probe, config, writer, args.stream, args.from_token, args.to_token
            ):
                pages += 1
                show_page(page)
                progress.update(bar, completed=page.upto_token - args.from_token, rows=stats.shown)
                progress.refresh()
                if session.stopping:
                    break
        except HistoryUnavailable as e:
            raise RuntimeFailure(e.problem) from None
    await probe.http.close()
    print_summary(
        err,
        "synrepl catchup",
        stats,
        [f"{pages} page(s) of ({args.from_token}, {args.to_token}] from {writer} at {location}"],
        unit="rows",
    )
    return EXIT_OK
