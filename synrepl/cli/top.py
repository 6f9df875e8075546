"""``synrepl top``: a live view of the channel, per stream and writer."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

import attrs
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from twisted.internet.task import LoopingCall

from synrepl.cli._errors import EXIT_OK
from synrepl.cli._options import add_cluster_options, cluster_config, positive_float, split_words
from synrepl.cli._render import Stats, make_console, print_summary
from synrepl.cli._runtime import Session
from synrepl.cli.watch import watch_channel
from synrepl.commands import Command, PositionCommand, RdataCommand, parse_line
from synrepl.errors import ProtocolError, UnknownCommandError

__all__ = ("add_parser", "run", "Rates")

DESCRIPTION = """\
A live view of a cluster's replication channel, refreshed every second: rows
per second for each stream and writer, their newest token and how far each
writer is behind the stream's newest token (lag), commands per second, bad
lines and Redis reconnects.  Read-only, like watch, unless --replicate.
When stdout is not a terminal it prints a plain-text block every --interval.
"""

EPILOG = """\
examples:
  synrepl top -c /etc/synapse/homeserver.yaml
  synrepl top --server-name example.com --redis-url redis://10.0.0.5:6379
  synrepl top -c homeserver.yaml --stream events --duration 60 > top.log

exit status: 0 stopped normally (Ctrl-C, --duration); 1 Redis unreachable;
2 bad usage or config.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "top",
        help="live rates per stream and writer, lag, reconnects",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_options(parser)
    parser.add_argument(
        "-s", "--stream", metavar="STREAM", action="append", default=[], help="only these streams"
    )
    parser.add_argument(
        "--interval",
        metavar="SECONDS",
        type=positive_float,
        default=1.0,
        help="refresh period (default: 1)",
    )
    parser.add_argument(
        "--duration", metavar="SECONDS", type=positive_float, help="stop after this long"
    )
    parser.add_argument(
        "--replicate",
        action="store_true",
        help="publish REPLICATE on connect so that writers announce their positions",
    )
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour the view"
    )
    parser.set_defaults(run=run)
    return parser


@attrs.define
class _Pair:
    rows: int = 0
    rows_at_tick: int = 0
    rate: float = 0.0
    token: int | None = None
    last_seen: float = 0.0


@attrs.define
class Rates:
    """Counts since the start, and rates over the last interval."""

    streams: frozenset[str] | None = None
    pairs: dict[tuple[str, str], _Pair] = attrs.Factory(dict)
    commands: Counter[str] = attrs.Factory(Counter)
    commands_at_tick: Counter[str] = attrs.Factory(Counter)
    command_rates: dict[str, float] = attrs.Factory(dict)
    lines: int = 0
    lines_at_tick: int = 0
    line_rate: float = 0.0
    last_tick: float = attrs.Factory(time.monotonic)

    def on_command(self, cmd: Command) -> None:
        self.commands[cmd.NAME] += 1
        if not isinstance(cmd, RdataCommand | PositionCommand):
            return
        if self.streams is not None and cmd.stream_name not in self.streams:
            return
        pair = self.pairs.setdefault((cmd.stream_name, cmd.instance_name), _Pair())
        pair.last_seen = time.monotonic()
        token = cmd.token if isinstance(cmd, RdataCommand) else cmd.new_token
        if isinstance(cmd, RdataCommand):
            pair.rows += 1
        if token is not None and (pair.token is None or token > pair.token):
            pair.token = token

    def tick(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self.last_tick, 1e-6)
        self.last_tick = now
        for pair in self.pairs.values():
            pair.rate = (pair.rows - pair.rows_at_tick) / elapsed
            pair.rows_at_tick = pair.rows
        self.command_rates = {
            name: (n - self.commands_at_tick[name]) / elapsed for name, n in self.commands.items()
        }
        self.commands_at_tick = Counter(self.commands)
        self.line_rate = (self.lines - self.lines_at_tick) / elapsed
        self.lines_at_tick = self.lines

    def lag(self, stream: str, writer: str) -> int | None:
        token = self.pairs[(stream, writer)].token
        tokens = [
            p.token for (s, _), p in self.pairs.items() if s == stream and p.token is not None
        ]
        if token is None or not tokens:
            return None
        return max(tokens) - token


def _table(rates: Rates, stats: Stats, title: str) -> Group:
    head = Text(
        f"{title}  {rates.line_rate:,.1f} lines/s  {rates.lines:,} lines  "
        f"{stats.bad_lines + stats.unknown_commands:,} bad  {stats.reconnects:,} reconnects",
        style="bold",
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (
        ("stream", "left"),
        ("writer", "left"),
        ("rows/s", "right"),
        ("rows", "right"),
        ("token", "right"),
        ("lag", "right"),
        ("seen", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    now = time.monotonic()
    for (stream, writer), pair in sorted(rates.pairs.items()):
        lag = rates.lag(stream, writer)
        table.add_row(
            Text(stream, style="cyan"),
            Text(writer, style="yellow"),
            f"{pair.rate:,.1f}",
            f"{pair.rows:,}",
            "?" if pair.token is None else f"{pair.token:,}",
            Text("" if not lag else f"{lag:,}", style="red" if lag else ""),
            f"{now - pair.last_seen:.0f}s ago",
        )
    commands = Text(
        "  ".join(
            f"{name} {rates.command_rates.get(name, 0.0):,.1f}/s"
            for name, _ in rates.commands.most_common()
        )
        or "no commands yet",
        style="dim",
    )
    return Group(head, table, commands)


async def run(reactor: Any, args: argparse.Namespace) -> int:
    config = cluster_config(args, need_redis=True)
    streams = frozenset(split_words(args.stream)) or None
    rates = Rates(streams=streams)
    stats = Stats()
    session = Session(reactor, duration=args.duration)

    def on_line(channel: str, line: str) -> None:
        rates.lines += 1
        stats.lines += 1
        try:
            cmd = parse_line(line)
        except UnknownCommandError:
            stats.unknown_commands += 1
            return
        except ProtocolError:
            stats.bad_lines += 1
            return
        stats.saw_command(cmd)
        if isinstance(cmd, RdataCommand):
            stats.saw_rows(cmd.stream_name, cmd.instance_name, 1)
        rates.on_command(cmd)

    transport = await watch_channel(
        reactor,
        config,
        on_line,
        stats,
        replicate=args.replicate,
        timeout=args.connect_timeout,
        client_name="synrepl-top",
    )
    console = make_console(args.color)
    title = f"synrepl top: {config.server_name} on {transport.address}"
    live: Live | None = None
    if console.is_terminal:
        live = Live(console=console, auto_refresh=False, transient=False)
        live.start()

    def refresh() -> None:
        rates.tick()
        view = _table(rates, stats, title)
        if live is not None:
            live.update(view, refresh=True)
        else:
            console.print(Text(time.strftime("--- %H:%M:%S ---"), style="dim"))
            console.print(view)
            console.file.flush()

    loop = LoopingCall(refresh)
    loop.clock = reactor
    loop.start(args.interval, now=True)
    await session.wait()
    loop.stop()
    if live is not None:
        live.stop()
    await transport.stop()
    print_summary(make_console(args.color, stderr=True), "synrepl top", stats, shown=False)
    return EXIT_OK
