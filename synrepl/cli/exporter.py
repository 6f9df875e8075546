"""``synrepl exporter``: the cluster's replication as Prometheus metrics.

A long-running, read-only process: it subscribes to the replication channel
(never publishing anything, not even REPLICATE) and serves ``/metrics`` with
what the channel says about every stream and writer (see
:mod:`synrepl.cli._cluster` and ``docs/metrics.md``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from synrepl.cli._cluster import ClusterCollector, ClusterView
from synrepl.cli._errors import EXIT_OK, RuntimeFailure, UsageError
from synrepl.cli._options import add_cluster_options, cluster_config
from synrepl.cli._render import Stats, make_console, print_summary
from synrepl.cli._runtime import Session
from synrepl.cli.watch import watch_channel
from synrepl.commands import parse_line
from synrepl.errors import ProtocolError, UnknownCommandError

__all__ = ("add_parser", "parse_listen", "serve_metrics", "run")

DEFAULT_LISTEN = "127.0.0.1:9469"

#: The classic text format, which ``generate_latest`` writes (names here are
#: plain ASCII) and every Prometheus since 2.0 reads.
TEXT_FORMAT = b"text/plain; version=0.0.4; charset=utf-8"

DESCRIPTION = """\
Serve the cluster's replication as Prometheus metrics on /metrics: for every
stream and writer the newest position announced on the channel, its lag
behind the stream's newest and the seconds since it was last heard, the
per-stream minimum over writers (what workers wait for), writers the config
names but that are silent, commands per sender and command, and the
exporter's own health.  Read-only: it never publishes anything.
"""

EPILOG = """\
examples:
  synrepl exporter -c /etc/synapse/homeserver.yaml
  synrepl exporter -c homeserver.yaml -c workers/persister1.yaml --listen 127.0.0.1:9469

exit status: 0 stopped (Ctrl-C, --duration); 1 Redis unreachable or the
address cannot be listened on; 2 bad usage or config.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "exporter",
        help="serve the cluster's replication positions and lag to Prometheus",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_options(parser)
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_LISTEN,
        help=f"where to serve /metrics (default: {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--duration", metavar="SECONDS", type=float, help="stop after this long (for tests)"
    )
    parser.set_defaults(run=run)
    return parser


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port).

    Raises:
        UsageError: not of that form, or the port is not in 0-65535.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen wants HOST:PORT, such as {DEFAULT_LISTEN}, not {text!r}")
    return host, int(port)


class MetricsPage(Resource):
    """``/metrics``, rendered on the reactor's thread: the view is read where
    it is written (prometheus-client's own Twisted resource would collect
    in a thread pool, while lines keep changing the view)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", TEXT_FORMAT)  # type: ignore[no-untyped-call]
        return generate_latest(self._registry)


def serve_metrics(reactor: Any, registry: CollectorRegistry, listen: str) -> Any:
    """Serve ``registry`` as ``/metrics`` on ``listen`` (HOST:PORT); the
    listening port, to ``stopListening()``.

    Raises:
        UsageError: ``listen`` is not HOST:PORT.
        RuntimeFailure: the address cannot be listened on.
    """
    host, port = parse_listen(listen)
    root = Resource()  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", MetricsPage(registry))  # type: ignore[arg-type]
    try:
        return reactor.listenTCP(port, Site(root), interface=host)  # type: ignore[no-untyped-call]
    except Exception as e:
        raise RuntimeFailure(f"cannot listen on {listen}: {e}") from e


async def run(reactor: Any, args: argparse.Namespace) -> int:
    config = cluster_config(args, need_redis=True)
    parse_listen(args.listen)  # a bad address is a usage error before anything starts
    session = Session(reactor, duration=args.duration)
    stats = Stats()
    view = ClusterView(config)
    holder: list[Any] = []

    def on_line(channel: str, line: str) -> None:
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
        view.saw(cmd, reactor.seconds())

    registry = CollectorRegistry()
    registry.register(
        ClusterCollector(
            view,
            stats,
            reactor.seconds,
            lambda: bool(holder) and holder[0].subscribed,
            time.time(),
        )
    )
    listener = serve_metrics(reactor, registry, args.listen)
    transport = await watch_channel(
        reactor,
        config,
        on_line,
        stats,
        replicate=False,
        timeout=args.connect_timeout,
        client_name="synrepl-exporter",
    )
    holder.append(transport)
    bound = listener.getHost()
    console = make_console("auto", stderr=True)
    console.print(
        f"synrepl exporter: {config.server_name!r} on Redis {transport.address}; "
        f"metrics on http://{bound.host}:{bound.port}/metrics",
        highlight=False,
    )
    await session.wait()
    await listener.stopListening()
    await transport.stop()
    print_summary(console, "synrepl exporter", stats, shown=False)
    return EXIT_OK
