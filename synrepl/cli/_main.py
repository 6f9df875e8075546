"""The ``synrepl`` command line: argument parsing and the run loop."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from twisted.internet import defer, task

from synrepl import __version__
from synrepl.cli import (
    audit,
    catchup,
    conformance,
    demo,
    doctor,
    export,
    exporter,
    positions,
    top,
    watch,
)
from synrepl.cli._errors import EXIT_FAILURE, EXIT_USAGE, CliError
from synrepl.cli._runtime import setup_logging
from synrepl.errors import ConfigError, excerpt

__all__ = ("main", "build_parser")

DESCRIPTION = """\
Look at a Synapse cluster's replication: what flows over its Redis channel,
where each writer's streams stand, and whether its configuration holds together.
New here? Run `synrepl demo` to see decoded replication traffic at once.
"""

EPILOG = """\
examples:
  synrepl demo                                   # simulated homeserver, live decoded traffic
  synrepl watch -c homeserver.yaml               # the real thing, read-only
  synrepl positions -c homeserver.yaml           # which writer is behind?
  synrepl doctor -c homeserver.yaml -c worker.yaml   # is my worker config right?
  synrepl catchup events --writer event_persister1 --from 1200 --to 1300 -c homeserver.yaml
  synrepl top -c homeserver.yaml
  synrepl audit -c homeserver.yaml --window 60   # rows Synapse wrote and never published?
  synrepl conformance -c homeserver.yaml -c worker.yaml --redis-url redis://127.0.0.1:6390
  synrepl export -c homeserver.yaml --full --to redis-stream://127.0.0.1:6379/events \\
      --checkpoint export.checkpoint

`synrepl COMMAND --help` shows each command's options and examples.

exit status: 0 success; 1 a runtime failure (Redis unreachable, secret
refused, ...) or, for doctor, a failed check; 2 bad usage or a config that
cannot be read or is invalid; 3 positions flagged a lagging or silent writer,
audit found rows lost, or conformance found a rule broken.
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (plus the usage) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"synrepl: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="synrepl",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"synrepl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    subparsers = parser.add_subparsers(
        title="commands", metavar="COMMAND", parser_class=_Parser, dest="command"
    )
    for module in (
        demo,
        watch,
        positions,
        doctor,
        catchup,
        top,
        exporter,
        audit,
        conformance,
        export,
    ):
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: parse, run on the reactor, exit with the status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        sys.exit(EXIT_USAGE)
    setup_logging(args.verbose, debug=args.debug)
    task.react(lambda reactor: defer.ensureDeferred(_run(reactor, args)))


async def _run(reactor: Any, args: argparse.Namespace) -> None:
    try:
        code = await args.run(reactor, args)
    except CliError as e:
        _error_line(e.message)
        code = e.code
    except ConfigError as e:  # one a subcommand did not wrap: still the user's config
        _error_line(f"bad config: {e}")
        code = EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - one line, never a traceback by default
        if args.debug:
            traceback.print_exc()
        _error_line(
            f"internal error: {type(e).__name__}: {excerpt(str(e))} (--debug shows the traceback)"
        )
        code = EXIT_FAILURE
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    raise SystemExit(code)


def _error_line(message: str) -> None:
    """One line, whatever the message holds (a file name, a peer's error text)."""
    if not message.isprintable():
        message = repr(message)[1:-1]
    sys.stderr.write(f"synrepl: error: {message}\n")
    sys.stderr.flush()
