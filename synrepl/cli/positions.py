"""``synrepl positions``: where every writer's streams stand, and who is behind."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

import attrs
from rich import box
from rich.table import Table
from rich.text import Text

from synrepl.cli._errors import EXIT_FLAGGED, EXIT_OK, RuntimeFailure
from synrepl.cli._http import instance_releases
from synrepl.cli._options import (
    add_cluster_options,
    cluster_config,
    non_negative_int,
    positive_float,
    split_words,
)
from synrepl.cli._render import Stats, make_console, stream_order
from synrepl.cli._runtime import sleep
from synrepl.cli.watch import watch_channel
from synrepl.commands import PositionCommand, parse_line
from synrepl.config import SynapseConfig
from synrepl.errors import ProtocolError
from synrepl.releases import SynapseRelease, facts_for
from synrepl.sharding import MAIN_INSTANCE_NAME, canonical_instance_name
from synrepl.streams import STREAM_NAMES

__all__ = ("add_parser", "run", "Report", "collect_report")

DESCRIPTION = """\
Publish REPLICATE on the cluster's channel, collect the POSITION every writer
answers with for a short window, and print a table of stream x writer with
each writer's token and the stream's minimum (the point every writer has
reached).  Flagged: writers more than --max-lag tokens behind the stream's
newest token; writers the config gives a stream that did not answer for it;
instances (instance_map, stream_writers) that sent no POSITION at all.

Note: this publishes one REPLICATE, as every Synapse worker does when it
connects; the writers answer it with their POSITIONs.
"""

EPILOG = """\
examples:
  synrepl positions -c /etc/synapse/homeserver.yaml
  synrepl positions -c homeserver.yaml --stream events --stream receipts
  synrepl positions --server-name example.com --redis-url redis://10.0.0.5 --json
  synrepl positions -c homeserver.yaml --window 5 --max-lag 1000

exit status: 0 every configured writer answered and none lags more than
--max-lag; 3 some writer lags or did not answer (see the flags); 1 nothing
answered at all, or Redis unreachable; 2 bad usage or config.
"""

#: Streams whose writer the config cannot name: any instance may write them.
_ANY_WRITER = frozenset({"caches"})
#: Streams Synapse replicates only in some setups (federation sending on main).
_OPTIONAL = frozenset({"federation"})


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "positions",
        help="table of stream x writer tokens after REPLICATE; flags lagging writers",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_options(parser)
    parser.add_argument(
        "--window",
        metavar="SECONDS",
        type=positive_float,
        default=2.0,
        help="how long to collect POSITIONs after REPLICATE (default: 2)",
    )
    parser.add_argument(
        "--max-lag",
        metavar="TOKENS",
        type=non_negative_int,
        default=100,
        help="flag a writer this far behind its stream's newest token (default: 100)",
    )
    parser.add_argument(
        "-s", "--stream", metavar="STREAM", action="append", default=[], help="only these streams"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour the table"
    )
    parser.set_defaults(run=run)
    return parser


@attrs.define
class Report:
    """What the window collected, and what it means."""

    server_name: str
    window: float
    max_lag: int
    #: (stream, writer) -> the token of the writer's latest POSITION.
    tokens: dict[tuple[str, str], int] = attrs.Factory(dict)
    #: Pairs that answered with a POSITION.
    answered: set[tuple[str, str]] = attrs.Factory(set)
    #: stream -> writers the configuration expects to answer.
    expected: dict[str, tuple[str, ...]] = attrs.Factory(dict)
    #: Instances named by the configuration (instance_map, stream_writers).
    instances: tuple[str, ...] = ()

    def streams(self) -> list[str]:
        """Streams someone answered for, in Synapse's order."""
        return sorted({s for s, _ in self.tokens}, key=stream_order)

    def writers(self, stream: str) -> list[str]:
        """Writers heard on ``stream``, and those the configuration gives it."""
        names = {w for s, w in self.tokens if s == stream}
        return _ordered(names | set(self.expected.get(stream, ())))

    def newest(self, stream: str) -> int | None:
        values = [t for (s, _), t in self.tokens.items() if s == stream]
        return max(values) if values else None

    def minimum(self, stream: str) -> int | None:
        """The lowest token over the stream's writers; None if one did not answer."""
        values = []
        for writer in self.writers(stream):
            token = self.tokens.get((stream, writer))
            if token is None:
                return None
            values.append(token)
        return min(values) if values else None

    def lag(self, stream: str, writer: str) -> int | None:
        token = self.tokens.get((stream, writer))
        newest = self.newest(stream)
        if token is None or newest is None:
            return None
        return newest - token

    def missing(self, stream: str) -> list[str]:
        return [w for w in self.writers(stream) if (stream, w) not in self.tokens]

    def silent_instances(self) -> list[str]:
        heard = {w for _, w in self.tokens}
        return [name for name in self.instances if name not in heard]

    def flags(self) -> list[dict[str, Any]]:
        flags: list[dict[str, Any]] = []
        silent = set(self.silent_instances())
        for stream in self.streams():
            for writer in self.writers(stream):
                lag = self.lag(stream, writer)
                if lag is None:
                    if writer not in silent:
                        flags.append({"kind": "no_answer", "stream": stream, "writer": writer})
                elif lag > self.max_lag:
                    flags.append({"kind": "lag", "stream": stream, "writer": writer, "lag": lag})
        for name in sorted(silent):
            flags.append({"kind": "silent_instance", "writer": name})
        return flags

    def as_json(self) -> dict[str, Any]:
        streams: dict[str, Any] = {}
        for stream in self.streams():
            writers: dict[str, Any] = {}
            for writer in self.writers(stream):
                token = self.tokens.get((stream, writer))
                writers[writer] = {
                    "token": token,
                    "lag": self.lag(stream, writer),
                    "answered": (stream, writer) in self.answered,
                }
            streams[stream] = {"writers": writers, "minimum": self.minimum(stream)}
        return {
            "server_name": self.server_name,
            "window": self.window,
            "max_lag": self.max_lag,
            "streams": streams,
            "flags": self.flags(),
        }


def _sharded(writers: tuple[str, ...]) -> bool:
    return any(w != MAIN_INSTANCE_NAME for w in writers)


def _ordered(names: set[str]) -> list[str]:
    return sorted(names, key=lambda n: (n != MAIN_INSTANCE_NAME, n))


def expected_writers(
    config: SynapseConfig,
    streams: list[str] | None,
    releases: Mapping[str, SynapseRelease] | None = None,
) -> dict[str, tuple[str, ...]]:
    """stream -> the writers that answer REPLICATE for it, per the configuration.

    ``releases`` (instance -> the Synapse release it runs, see
    :func:`~synrepl.cli._http.instance_releases`) leaves out a writer whose
    release has no such stream: it will never speak of it.
    """
    streams_of = {name: facts_for(release).streams for name, release in (releases or {}).items()}
    out: dict[str, tuple[str, ...]] = {}
    for stream in STREAM_NAMES:
        if stream in _ANY_WRITER or stream in _OPTIONAL:
            continue
        if streams is not None and stream not in streams:
            continue
        writers = [
            name
            for name in dict.fromkeys(
                canonical_instance_name(w) for w in config.stream_writers.writers_for_stream(stream)
            )
            if name not in streams_of or stream in streams_of[name]
        ]
        if writers:
            out[stream] = tuple(writers)
    return out


async def collect_report(
    reactor: Any,
    config: SynapseConfig,
    *,
    window: float,
    max_lag: int,
    streams: list[str] | None,
    timeout: float,
) -> Report:
    """REPLICATE, then collect POSITIONs for ``window`` seconds (the latest per pair)."""
    report = Report(config.server_name, window, max_lag)
    report.expected = expected_writers(config, streams, await instance_releases(reactor, config))
    # With --stream, only the writers of those streams are expected to speak.
    named = set(config.instance_map) if streams is None else set()
    named |= {w for ws in report.expected.values() for w in ws}
    report.instances = tuple(_ordered(named))
    wanted = None if streams is None else set(streams)

    def on_line(channel: str, line: str) -> None:
        if not line.startswith("POSITION "):
            return
        try:
            cmd = parse_line(line)
        except ProtocolError:
            return
        if not isinstance(cmd, PositionCommand):
            return
        if wanted is not None and cmd.stream_name not in wanted:
            return
        key = (cmd.stream_name, cmd.instance_name)
        report.answered.add(key)
        report.tokens[key] = cmd.new_token

    transport = await watch_channel(
        reactor,
        config,
        on_line,
        Stats(),
        replicate=True,
        timeout=timeout,
        client_name="synrepl-positions",
    )
    await sleep(reactor, window)
    await transport.stop()
    return report


async def run(reactor: Any, args: argparse.Namespace) -> int:
    config = cluster_config(args, need_redis=True)
    streams = split_words(args.stream) or None
    report = await collect_report(
        reactor,
        config,
        window=args.window,
        max_lag=args.max_lag,
        streams=streams,
        timeout=args.connect_timeout,
    )
    if not report.answered:
        raise RuntimeFailure(
            f"no POSITION within {args.window:g} s on channel {config.server_name!r}: no Synapse "
            "process answered REPLICATE (is server_name the processes' own? do they use this "
            "Redis, with redis.enabled: true?)"
        )
    flags = report.flags()
    if args.json:
        print(json.dumps(report.as_json()))
    else:
        _print_table(report, args.color)
    return EXIT_FLAGGED if flags else EXIT_OK


def _print_table(report: Report, color: str) -> None:
    console = make_console(color)
    writers = _ordered({w for s in report.streams() for w in report.writers(s)})
    table = Table(
        title=f"positions on {report.server_name} ({report.window:g} s after REPLICATE)",
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("stream", style="cyan")
    for writer in writers:
        table.add_column(writer, justify="right")
    table.add_column("minimum", justify="right", style="bold")
    for stream in report.streams():
        cells: list[Text] = []
        stream_writers = report.writers(stream)
        for writer in writers:
            if writer not in stream_writers:
                cells.append(Text("·", style="dim"))
                continue
            token = report.tokens.get((stream, writer))
            if token is None:
                cells.append(Text("no answer", style="bold red"))
                continue
            lag = report.lag(stream, writer) or 0
            cell = Text(f"{token:,}")
            if lag:
                behind = lag > report.max_lag
                cell.append(f" (-{lag:,})", style="bold red" if behind else "yellow")
            cells.append(cell)
        minimum = report.minimum(stream)
        table.add_row(stream, *cells, Text("?" if minimum is None else f"{minimum:,}"))
    console.print(table)
    flags = report.flags()
    for flag in flags:
        writer = flag["writer"]
        if flag["kind"] == "lag":
            text = (
                f"! {writer} is {flag['lag']:,} tokens behind on {flag['stream']} "
                f"(more than --max-lag {report.max_lag:,})"
            )
        elif flag["kind"] == "no_answer":
            text = (
                f"! {writer} did not answer for {flag['stream']}, although the config "
                "makes it a writer of that stream"
            )
        else:
            text = (
                f"! {writer} sent no POSITION at all: is it running, with redis.enabled, "
                "on this Redis and server_name?"
            )
        console.print(Text(text, style="bold red"))
    if not flags:
        console.print(Text("every writer answered; none lags", style="green"))
