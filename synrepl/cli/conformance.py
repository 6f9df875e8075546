"""``synrepl conformance``: play a scripted homeserver at a process and judge
what it publishes.

The rules are :mod:`synrepl.conformance`'s; this module carries out the
script on a Redis the process under test has to itself (see
:mod:`synrepl.cli._probe`), feeds every MONITOR entry to a
:class:`~synrepl.conformance.Conformance`, and reports per rule.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Collection
from typing import Any

import attrs
import redis
from rich import box
from rich.table import Table
from rich.text import Text
from twisted.internet import threads

from synrepl.cli._errors import EXIT_FLAGGED, EXIT_OK, RuntimeFailure, UsageError
from synrepl.cli._options import (
    add_cluster_options,
    cluster_config,
    positive_float,
    release_argument,
    split_words,
)
from synrepl.cli._probe import ClientInfo, RedisProbe
from synrepl.cli._render import make_console
from synrepl.cli._runtime import Session
from synrepl.config import SynapseConfig
from synrepl.conformance import RULES, Conformance
from synrepl.monitor import MonitorEntry
from synrepl.releases import SynapseRelease
from synrepl.streams import STREAM_NAMES, CachesRow, EventRow, ReceiptsRow, TypingRow
from synrepl.testing.writers import SimulatedWriters

__all__ = ("add_parser", "run", "GARBAGE", "Report", "conform")

DESCRIPTION = """\
Play a scripted homeserver at a process (a Synapse worker, a Go or Rust
worker, another library) and check what it publishes against the protocol.
The process must use a Redis of its own (a redis-server started for the
check): every client on it that is not this command is taken to be the
process.  The command watches with MONITOR and, in turn:

  1. waits (--wait) for the process to subscribe to the channel, and for
     its REPLICATE;
  2. kills all its connections (CLIENT KILL) and waits for it to subscribe
     again and REPLICATE;
  3. publishes rows as writers do (events, typing, receipts, caches) and
     answers every REPLICATE with POSITIONs;
  4. publishes malformed lines, and watches that no connection drops;
  5. kills only its subscription, and waits for it to come back and REPLICATE.

Each rule is reported as passed, failed (with the line that broke it) or
not exercised (the process never did what the rule is about: a worker that
serves no /sync sends no USER_SYNC).  The rows are fictional: never point
this at a production process.
"""

EPILOG = """\
examples:
  redis-server --port 6390 &   # the process's own Redis
  synrepl conformance -c homeserver.yaml -c worker.yaml --redis-url redis://127.0.0.1:6390
  synrepl conformance --server-name example.org --redis-url redis://127.0.0.1:6390 --json

exit status: 0 no rule was broken; 3 a rule was broken (named, with its line);
1 no process subscribed within --wait, or Redis unreachable; 2 bad usage.
"""

#: Lines a homeserver should never send, which a process must survive.
#: Each fails to parse for Synapse and for synrepl (tests pin both).
GARBAGE: tuple[str, ...] = (
    "NOT_A_COMMAND with some words",
    "RDATA",
    "RDATA events master",
    "RDATA events master not-a-token []",
    'RDATA typing master 7 ["!room:example.org", [',
    "POSITION caches master five 6",
    "USER_SYNC",
    "\x00\x01\x02 \x7f",
)

#: The channel the probe marks points of its own on (never the homeserver's).
MARKER_CHANNEL = "synrepl-conformance-marker"

#: Seconds the process is left alone after each (re)connection: what it does
#: once connected is watched before the next step.
SETTLE = 1.0

#: Seconds between looks at CLIENT LIST (lost connections).
POLL = 0.2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "conformance",
        help="play a scripted homeserver at a process and check what it publishes",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_options(parser)
    parser.add_argument(
        "--writes",
        metavar="STREAM",
        action="append",
        default=[],
        help="a stream the process writes, so it may send its RDATA and POSITION "
        "(repeatable or comma-separated; default: from -c, the streams its instance "
        "writes, and caches)",
    )
    parser.add_argument(
        "--wait",
        metavar="SECONDS",
        type=positive_float,
        default=30.0,
        help="how long to wait for the process to subscribe (default: 30)",
    )
    parser.add_argument(
        "--replicate-within",
        metavar="SECONDS",
        type=positive_float,
        default=5.0,
        help="the time allowed from a (re)subscription to its REPLICATE, and from a "
        "lost subscription to the next one (default: 5)",
    )
    parser.add_argument(
        "--garbage-grace",
        metavar="SECONDS",
        type=positive_float,
        default=5.0,
        help="how long after malformed lines no connection may drop (default: 5)",
    )
    parser.add_argument(
        "--release",
        metavar="VERSION",
        type=release_argument,
        help="the Synapse release the process is (default: the newest synrepl knows): "
        "streams that release lacks are never announced to it",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour the report"
    )
    parser.set_defaults(run=run)
    return parser


@attrs.define
class Report:
    """What the check did and found."""

    conformance: Conformance
    #: (step, what happened) in the order the script ran.
    steps: list[tuple[str, str]] = attrs.Factory(list)
    #: Why the script ended early (Ctrl-C), if it did.
    stopped: str | None = None

    def rule_results(self) -> list[dict[str, Any]]:
        """One entry per rule: passed, failed (with the breach) or not exercised."""
        out: list[dict[str, Any]] = []
        for rule in RULES:
            breach = self.conformance.breaches.get(rule)
            exercised = self.conformance.exercised[rule]
            entry: dict[str, Any] = {"rule": rule, "exercised": exercised}
            if breach is not None:
                entry.update(status="failed", why=breach.why, at=breach.at, line=breach.line)
            else:
                entry["status"] = "passed" if exercised else "not exercised"
            out.append(entry)
        return out

    def exit_status(self) -> int:
        """0 nothing broken, 3 a rule broken."""
        return EXIT_FLAGGED if self.conformance.breaches else EXIT_OK

    def as_json(self) -> dict[str, Any]:
        """The report as one JSON object."""
        return {
            "server_name": self.conformance.server_name,
            "rules": self.rule_results(),
            "steps": [{"step": s, "result": r} for s, r in self.steps],
            "stopped": self.stopped,
            "conforms": not self.conformance.breaches,
        }


class _ScriptedHomeserver(SimulatedWriters):
    """The simulated writers, publishing through the probe."""

    def __init__(self, probe: RedisProbe, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._probe = probe

    def _publish(self, line: str) -> None:
        self._probe.publish(self.server_name, line)

    def heard(self, channel: str, line: str) -> None:
        """A line the process published (REPLICATE is answered)."""
        self._on_line(channel, line)


class _Script:
    """The steps of the check, carried out on the probe (see DESCRIPTION)."""

    def __init__(
        self,
        probe: RedisProbe,
        conformance: Conformance,
        homeserver: _ScriptedHomeserver,
        *,
        replicate_within: float,
        garbage_grace: float,
        stopping: Callable[[], bool],
    ) -> None:
        self.probe = probe
        self.conformance = conformance
        self.homeserver = homeserver
        self.replicate_within = replicate_within
        self.garbage_grace = garbage_grace
        self.stopping = stopping
        self.report = Report(conformance)
        self._known: dict[str, ClientInfo] = {}
        self._markers: dict[str, tuple[str, list[str]]] = {}
        #: Whether a REPLICATE came after the latest subscription.
        self._replicated = False

    # --- steps ----------------------------------------------------------------------

    def attach(self, wait: float) -> None:
        """Wait for the process's subscription (and, if it was seen, its REPLICATE)."""
        self._poll()
        fresh = not any(c.subscriptions for c in self._known.values())
        for client in self._known.values():
            if client.subscriptions:
                self.conformance.already_subscribed(client.addr)
        before = self._subscriptions()
        if not self._pump(wait, lambda: self.conformance.subscribed_now):
            raise RuntimeFailure(
                f"no client subscribed to {self.conformance.server_name!r} within {wait:g} s "
                "(is the process running, on this Redis, with this server_name?)"
            )
        if fresh:
            self._await_replicate("first subscription", before)
        else:
            self.report.steps.append(("attach", "the process was already subscribed"))

    def reconnect(self, step: str, which: Callable[[ClientInfo], bool]) -> None:
        """Kill the connections ``which`` picks; wait for a new subscription and REPLICATE."""
        self._poll()
        victims = [c for c in self._known.values() if which(c)]
        if not victims:
            self.report.steps.append((step, "no connection to kill"))
            return
        before = self._subscriptions()
        self.probe.kill(victims)
        for client in victims:
            self._known.pop(client.addr, None)
        self._mark("forced", [c.addr for c in victims])
        self._pump(0.5, lambda: not self.conformance.subscribed_now)
        self._await_replicate(f"{step}: killed {len(victims)} connection(s)", before)

    def traffic(self) -> None:
        """Rows as writers send them, of every stream the process does not write."""
        hs, writes = self.homeserver, self.conformance.writes
        room = f"!conformance:{hs.server_name}"
        user = f"@conformance:{hs.server_name}"
        sent = 0
        for n in range(1, 4):
            event_id = f"$conformance-{n}"
            batches: list[tuple[str, list[Any]]] = [
                (
                    "events",
                    [EventRow(event_id, room, "m.room.message", *(None,) * 4, False, False)],
                ),
                ("typing", [TypingRow(room, (user,) if n % 2 else ())]),
                ("receipts", [ReceiptsRow(room, "m.read", user, event_id, None, {"ts": n})]),
                ("caches", [CachesRow("synrepl_conformance_probe", (str(n),), n)]),
            ]
            for stream, rows in batches:
                if stream not in writes:
                    hs.write(stream, rows)
                    sent += 1
        for stream in ("events", "typing"):
            if stream not in writes:
                hs.position(stream)
        self._pump(1.0)
        self.report.steps.append(("traffic", f"{sent} RDATA and 2 POSITION published"))

    def garbage(self) -> None:
        """Malformed lines, then ``garbage_grace`` seconds of watching."""
        for line in GARBAGE:
            self.probe.publish(self.conformance.server_name, line)
        self._pump(self.garbage_grace + POLL)
        self.report.steps.append(("garbage", f"{len(GARBAGE)} malformed lines published"))

    def finish(self) -> Report:
        """Settle, judge the deadlines, and return the report."""
        self._pump(POLL * 2)
        self.conformance.finish(self.probe.now())
        return self.report

    # --- the watch ------------------------------------------------------------------

    def _subscriptions(self) -> int:
        return self.conformance.exercised["replicate-on-subscribe"]

    def _replicates(self) -> int:
        """REPLICATEs the process published, as the rules counted them."""
        return self.conformance.exercised["replicate-after-subscribe"]

    def _await_replicate(self, step: str, before: int) -> None:
        """Wait for a subscription after the ``before``-th, and a REPLICATE after it."""
        started = time.monotonic()
        seen = self._pump(
            self.replicate_within * 2 + 1,
            lambda: self._subscriptions() > before and self._replicated,
        )
        took = time.monotonic() - started
        result = f"subscribed and REPLICATE after {took:.1f} s" if seen else "no REPLICATE"
        self.report.steps.append((step, result))
        self._pump(SETTLE)

    def _pump(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """Watch for ``seconds``, or until ``until()`` holds (then True)."""
        deadline = time.monotonic() + seconds
        next_poll = 0.0
        while True:
            if until is not None and until():
                return True
            now = time.monotonic()
            if now >= deadline or self.stopping():
                if self.stopping() and self.report.stopped is None:
                    self.report.stopped = "interrupted"
                return False
            if now >= next_poll:
                self._poll()
                next_poll = now + POLL
            for entry in self.probe.read(min(POLL, max(deadline - now, 0.0))):
                self._handle(entry)

    def _poll(self) -> None:
        current = {c.addr: c for c in self.probe.clients()}
        gone = [addr for addr in self._known if addr not in current]
        if gone:
            self._mark("lost", gone)
        self._known = current

    def _mark(self, kind: str, addrs: list[str]) -> None:
        """Apply a loss at its place in MONITOR's order: after every command
        the connections ran before it."""
        token = str(len(self._markers))
        self._markers[token] = (kind, addrs)
        self.probe.publish(MARKER_CHANNEL, token)

    def _handle(self, entry: MonitorEntry) -> None:
        if entry.client in self.probe.own_addrs:
            self._own(entry)
            return
        subscriptions, replicates = self._subscriptions(), self._replicates()
        self.conformance.monitored(entry)
        if self._subscriptions() > subscriptions:
            self._replicated = False
        elif self._replicates() > replicates and self.conformance.subscribed_now:
            self._replicated = True
        if entry.command == "publish" and len(entry.args) == 3:
            channel = entry.args[1].decode("utf-8", "replace")
            if channel == self.conformance.server_name:
                self.homeserver.heard(channel, entry.args[2].decode("utf-8", "replace"))

    def _own(self, entry: MonitorEntry) -> None:
        if entry.command != "publish" or len(entry.args) != 3:
            return
        channel = entry.args[1].decode("utf-8", "replace")
        payload = entry.args[2].decode("utf-8", "surrogateescape")
        if channel == MARKER_CHANNEL and payload in self._markers:
            kind, addrs = self._markers.pop(payload)
            for addr in addrs:
                self.conformance.connection_lost(entry.at, addr, forced=kind == "forced")
        elif channel == self.conformance.server_name:
            self.conformance.homeserver_sent(entry.at, payload)


def conform(
    config: SynapseConfig,
    *,
    writes: Collection[str],
    wait: float,
    replicate_within: float,
    garbage_grace: float,
    timeout: float,
    release: SynapseRelease | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> Report:
    """Run the whole check (blocking: call it on a thread of its own);
    ``release``: the Synapse release the homeserver looks like."""
    try:
        probe = RedisProbe(config.redis, timeout=timeout)
    except redis.RedisError as e:
        where = config.redis.path or f"{config.redis.host}:{config.redis.port}"
        raise RuntimeFailure(f"cannot reach Redis at {where}: {e}") from None
    try:
        clients_at_start = probe.clients()
        conformance = Conformance(
            config.server_name,
            writes=writes,
            replicate_within=replicate_within,
            garbage_grace=garbage_grace,
            watched_from_start=not any(c.subscriptions for c in clients_at_start),
        )
        homeserver = _ScriptedHomeserver(probe, server_name=config.server_name, release=release)
        script = _Script(
            probe,
            conformance,
            homeserver,
            replicate_within=replicate_within,
            garbage_grace=garbage_grace,
            stopping=stopping,
        )
        script.attach(wait)
        steps: list[Callable[[], None]] = [
            lambda: script.reconnect("reconnect (every connection)", lambda c: True),
            script.traffic,
            script.garbage,
            lambda: script.reconnect("reconnect (the subscription)", lambda c: c.subscriptions > 0),
        ]
        for step in steps:
            if stopping():
                break
            step()
        return script.finish()
    finally:
        probe.close()


def streams_written(config: SynapseConfig, named: list[str], from_files: bool) -> frozenset[str]:
    """The streams the process may send RDATA and POSITION for."""
    if named:
        unknown = sorted(set(named) - set(STREAM_NAMES))
        if unknown:
            raise UsageError(f"--writes: no such stream: {', '.join(unknown)}")
        return frozenset(named)
    if from_files:
        return frozenset(config.stream_writers.streams_written_by(config.instance_name))
    return frozenset({"caches"})


async def run(reactor: Any, args: argparse.Namespace) -> int:
    config = cluster_config(args, need_redis=True)
    writes = streams_written(config, split_words(args.writes), bool(args.config))
    session = Session(reactor)
    if not args.json:
        make_console(args.color, stderr=True).print(
            f"waiting for a process on {config.server_name!r} "
            f"(writes: {', '.join(sorted(writes))}); Ctrl-C ends the check early",
            style="dim",
        )
    report = await threads.deferToThread(
        conform,
        config,
        writes=writes,
        wait=args.wait,
        replicate_within=args.replicate_within,
        garbage_grace=args.garbage_grace,
        timeout=args.connect_timeout,
        release=args.release,
        stopping=lambda: session.stopping,
    )
    if args.json:
        print(json.dumps(report.as_json()))
    else:
        _print_report(report, args.color)
    return report.exit_status()


_STYLES = {"passed": "green", "failed": "bold red", "not exercised": "yellow"}


def _print_report(report: Report, color: str) -> None:
    console = make_console(color)
    for step, result in report.steps:
        console.print(Text(f"{step}: {result}", style="dim"))
    table = Table(
        title=f"conformance on {report.conformance.server_name}",
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
    )
    for name in ("rule", "result", "tested", "detail"):
        table.add_column(name, justify="right" if name == "tested" else "left")
    for r in report.rule_results():
        detail = ""
        if r["status"] == "failed":
            detail = r["why"] + (f": {r['line']!r}" if r["line"] is not None else "")
        table.add_row(
            Text(r["rule"], style="cyan"),
            Text(r["status"], style=_STYLES[r["status"]]),
            f"{r['exercised']:,}",
            detail,
        )
    console.print(table)
    if report.stopped:
        console.print(Text("the check was interrupted: later steps did not run", style="yellow"))
