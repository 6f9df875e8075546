"""``synrepl doctor``: check a deployment from its config files, line by line."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs
from rich.console import Console
from rich.text import Text

from synrepl.cli._errors import EXIT_FAILURE, EXIT_OK, UsageError
from synrepl.cli._http import ProbeClient, describe_location, explain_http_failure
from synrepl.cli._options import add_cluster_options, parse_redis_url, positive_float
from synrepl.cli._render import make_console
from synrepl.cli._runtime import RedisUnreachable, connect_redis, sleep
from synrepl.cli.watch import redis_address
from synrepl.commands import (
    PositionCommand,
    RdataCommand,
    ReplicateCommand,
    encode,
    parse_line,
    sender_of,
)
from synrepl.config import SynapseConfig, load_config, read_config_files
from synrepl.errors import ConfigError, ProtocolError
from synrepl.releases import INTEROP_TESTED, support_of
from synrepl.sharding import (
    MAIN_INSTANCE_NAME,
    MAIN_MAP_KEY,
    STREAM_WRITER_KEYS,
    InstanceLocation,
)

__all__ = ("add_parser", "run", "Check")

_MATRIX = ", ".join(str(r) for r in INTEROP_TESTED)


DESCRIPTION = f"""\
Check a Synapse deployment's replication from its config files and say, line
by line, what is right and what is wrong, with the fix:

  config     the files load; every stream writer is in instance_map; names;
             instance_map ports match the instances' replication listeners
             (for the files given); every worker file agrees with the shared one
  Redis      reachable, authenticated (AUTH), database selected (SELECT)
  traffic    lines seen on the channel; each instance answers REPLICATE
  listeners  each instance_map entry answers HTTP replication and accepts
             the worker_replication_secret
  versions   the Synapse version of each instance (its Server header), and
             whether synrepl supports it (the interop matrix: {_MATRIX})

doctor publishes one REPLICATE (as every worker does when it connects) so
that each process answers with its POSITIONs; --passive only listens.
"""

EPILOG = """\
examples:
  synrepl doctor -c /etc/synapse/homeserver.yaml
  synrepl doctor -c homeserver.yaml -c workers/event_persister1.yaml
  synrepl doctor -c homeserver.yaml --worker workers/generic1.yaml --worker workers/ep1.yaml
  synrepl doctor -c homeserver.yaml --passive --listen 10

exit status: 0 every check passed (warnings allowed); 1 a check failed;
2 bad usage, or a config file that cannot be read or parsed.
"""

Status = Literal["ok", "fail", "warn", "skip"]

_SYMBOLS = {"ok": "✓", "fail": "✗", "warn": "!", "skip": "-"}
_ASCII = {"ok": "[ok]  ", "fail": "[FAIL]", "warn": "[warn]", "skip": "[skip]"}
_STYLES = {"ok": "green", "fail": "bold red", "warn": "yellow", "skip": "dim"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "doctor",
        help="check config, Redis, traffic, listeners, secret and versions",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cluster_options(parser)
    parser.add_argument(
        "--worker",
        metavar="FILE",
        action="append",
        default=[],
        help="another worker's config file, checked against the -c files (repeatable)",
    )
    parser.add_argument(
        "--listen",
        metavar="SECONDS",
        type=positive_float,
        default=3.0,
        help="how long to watch the channel for traffic (default: 3)",
    )
    parser.add_argument(
        "--passive",
        action="store_true",
        help="publish nothing (no REPLICATE): only listen for traffic",
    )
    parser.add_argument(
        "--http-timeout",
        metavar="SECONDS",
        type=positive_float,
        default=5.0,
        help="how long each replication listener may take to answer (default: 5)",
    )
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour the report"
    )
    parser.set_defaults(run=run)
    return parser


@attrs.frozen
class Check:
    """One line of the report."""

    status: Status
    title: str
    fix: str | None = None


class _Report:
    def __init__(self, console: Console, *, unicode: bool) -> None:
        self._console = console
        self._symbols = _SYMBOLS if unicode else _ASCII
        self.checks: list[Check] = []

    def add(self, status: Status, title: str, fix: str | None = None) -> None:
        check = Check(status, title, fix)
        self.checks.append(check)
        line = Text()
        line.append(self._symbols[status] + " ", style=_STYLES[status])
        line.append(title, style="bold red" if status == "fail" else "")
        self._console.print(line)
        if fix:
            label = "fix" if status == "fail" else "hint"
            self._console.print(Text(f"    {label}: {fix}", style="cyan"))
        self._console.file.flush()

    def count(self, status: Status) -> int:
        return sum(1 for c in self.checks if c.status == status)


def _use_unicode(color: str) -> bool:
    if color == "never" or os.environ.get("NO_COLOR"):
        return False
    if color == "auto" and not sys.stdout.isatty():
        return False
    encoding = (getattr(sys.stdout, "encoding", None) or "ascii").lower()
    try:
        "✓✗".encode(encoding)
    except (LookupError, UnicodeEncodeError):
        return False
    return True


def _split_fix(message: str) -> tuple[str, str | None]:
    """ConfigError messages put the fix after '; '."""
    problem, sep, fix = message.partition("; ")
    return (problem, fix) if sep else (message, None)


async def run(reactor: Any, args: argparse.Namespace) -> int:
    if not args.config:
        raise UsageError(
            "doctor needs the deployment's config: -c homeserver.yaml [-c worker.yaml]"
        )
    console = make_console(args.color)
    report = _Report(console, unicode=_use_unicode(args.color))
    config = _check_config(args, report)
    if config is not None:
        await _check_redis_and_traffic(reactor, args, config, report)
        await _check_listeners(reactor, args, config, report)
    fails, warns = report.count("fail"), report.count("warn")
    summary = Text()
    if fails:
        summary.append(f"{fails} problem{'s' if fails != 1 else ''} found", style="bold red")
    else:
        summary.append("all checks passed", style="bold green")
    if warns:
        summary.append(f", {warns} warning{'s' if warns != 1 else ''}", style="yellow")
    console.print(summary)
    return EXIT_FAILURE if fails else EXIT_OK


# --- config ------------------------------------------------------------------


def _load(files: Sequence[str]) -> SynapseConfig:
    """load_config; an unreadable file is a usage error (exit 2)."""
    try:
        return load_config(*files)
    except ConfigError as e:
        if not e.path:
            raise UsageError(f"bad config: {e}") from None
        raise


def _check_config(args: argparse.Namespace, report: _Report) -> SynapseConfig | None:
    files = list(args.config)
    try:
        config = _load(files)
    except ConfigError as e:
        problem, fix = _split_fix(e.message)
        where = ".".join(e.path)
        report.add("fail", f"config: {where}: {problem}", fix or f"correct {where} in the config")
        return None
    names = ", ".join(files)
    who = "the main process" if config.is_main else f"worker {config.instance_name!r}"
    report.add("ok", f"config: loaded {names}, as {who} of {config.server_name!r}")
    for warning in config.warnings:
        if warning.startswith(f"instance_map.{MAIN_MAP_KEY} is missing"):
            continue  # reported as a failure below
        problem, fix = _split_fix(warning)
        report.add("warn", f"config: {problem}", fix)
    if args.redis_url:
        config = attrs.evolve(config, redis=parse_redis_url(args.redis_url))
    if args.server_name:
        config = attrs.evolve(config, server_name=args.server_name)
    _check_writers(config, report)
    _check_instance_map(config, report)
    if not config.redis.enabled:
        report.add(
            "fail",
            "config: redis.enabled is not true: workers cannot replicate without Redis",
            "set redis: {enabled: true, host: ..., port: ...} in the shared config",
        )
    # The same reader as load_config's: a FIFO among a directory's files is
    # skipped, not waited on; a file changed since is a 'bad config' (exit 2).
    _check_listener(config, read_config_files(*files), report)
    for worker_file in args.worker:
        _check_worker_file(files, worker_file, config, report)
    return config


def _check_writers(config: SynapseConfig, report: _Report) -> None:
    sharded = {
        key: config.stream_writers.for_key(key)
        for key in STREAM_WRITER_KEYS
        if config.stream_writers.for_key(key) != (MAIN_INSTANCE_NAME,)
    }
    if not sharded:
        report.add("ok", "stream writers: the main process writes every stream")
        return
    listed = "; ".join(f"{key} -> {', '.join(writers)}" for key, writers in sharded.items())
    report.add("ok", f"stream writers: {listed}; all in instance_map")


def _check_instance_map(config: SynapseConfig, report: _Report) -> None:
    writers = config.stream_writers.all_writers()
    needs_main = bool(config.instance_map) or writers != {MAIN_INSTANCE_NAME}
    if needs_main and MAIN_INSTANCE_NAME not in config.instance_map:
        report.add(
            "fail",
            f"instance_map: no entry for the main process ('{MAIN_MAP_KEY}')",
            f"add instance_map.{MAIN_MAP_KEY} with the host and port of the main process's "
            "replication listener",
        )
    seen: dict[str, str] = {}
    for name, location in sorted(config.instance_map.items()):
        where = location.netloc
        if where in seen:
            report.add(
                "fail",
                f"instance_map: {seen[where]} and {name} both point at {where}",
                "each instance needs its own replication listener; give each its own port "
                "(or socket path)",
            )
        else:
            seen[where] = name
    if config.instance_map:
        entries = ", ".join(
            f"{_map_key(n)} {describe_location(loc)}"
            for n, loc in sorted(config.instance_map.items(), key=lambda i: _instance_order(i[0]))
        )
        report.add("ok", f"instance_map: {entries}")


def _map_key(name: str) -> str:
    return MAIN_MAP_KEY if name == MAIN_INSTANCE_NAME else name


def _instance_order(name: str) -> tuple[bool, str]:
    return (name != MAIN_INSTANCE_NAME, name)


def _replication_listeners(raw: Mapping[str, Any], is_main: bool) -> list[Mapping[str, Any]]:
    key = "listeners" if is_main else "worker_listeners"
    found: list[Mapping[str, Any]] = []
    listeners = raw.get(key) or []
    if not isinstance(listeners, list):
        return found
    for listener in listeners:
        if not isinstance(listener, Mapping) or listener.get("type") != "http":
            continue
        for resource in listener.get("resources") or []:
            names = resource.get("names") if isinstance(resource, Mapping) else None
            if isinstance(names, list) and "replication" in names:
                found.append(listener)
                break
    return found


def _check_listener(config: SynapseConfig, raw: Mapping[str, Any], report: _Report) -> None:
    """Does this process's replication listener match its instance_map entry?"""
    name = config.instance_name
    listeners = _replication_listeners(raw, config.is_main)
    location = config.instance_map.get(name)
    key = "listeners" if config.is_main else "worker_listeners"
    is_writer = name in config.stream_writers.all_writers() and name != MAIN_INSTANCE_NAME
    if location is None:
        if is_writer:
            return  # load_config already refuses this
        if listeners:
            report.add(
                "warn",
                f"{_map_key(name)} has a replication listener but is not in instance_map",
                f"add instance_map.{_map_key(name)} if other processes must call it",
            )
        return
    if not listeners:
        report.add(
            "fail",
            f"{_map_key(name)}: in instance_map ({describe_location(location)}) but its "
            f"{key} have no replication resource",
            f"add to {key}: - {{port: {location.port or 'N'}, type: http, "
            "resources: [{names: [replication]}]}",
        )
        return
    if any(_listener_matches(listener, location) for listener in listeners):
        report.add(
            "ok",
            f"{_map_key(name)}: instance_map {describe_location(location)} matches its "
            "replication listener",
        )
        return
    described = ", ".join(_describe_listener(listener) for listener in listeners)
    report.add(
        "fail",
        f"{_map_key(name)}: instance_map says {describe_location(location)}, but its "
        f"replication listener is on {described}",
        f"make instance_map.{_map_key(name)} and the listener agree (the port or path)",
    )


def _listener_matches(listener: Mapping[str, Any], location: InstanceLocation) -> bool:
    if location.is_unix:
        return bool(listener.get("path") == location.path)
    return bool(listener.get("port") == location.port)


def _describe_listener(listener: Mapping[str, Any]) -> str:
    if listener.get("path"):
        return f"unix:{listener['path']}"
    return f"port {listener.get('port')}"


def _check_worker_file(
    base: Sequence[str], worker_file: str, shared: SynapseConfig, report: _Report
) -> None:
    try:
        config = _load([*base, worker_file])
    except ConfigError as e:
        problem, fix = _split_fix(e.message)
        report.add(
            "fail", f"{worker_file}: {'.'.join(e.path)}: {problem}", fix or "correct the file"
        )
        return
    name = config.instance_name
    if config.is_main:
        report.add(
            "fail",
            f"{worker_file}: no worker_name (or worker_app): it would run as the main process",
            "set worker_app: synapse.app.generic_worker and worker_name: <a unique name>",
        )
        return
    differences = []
    if config.stream_writers != shared.stream_writers:
        differences.append("stream_writers")
    if dict(config.instance_map) != dict(shared.instance_map):
        differences.append("instance_map")
    if _reveal(config.worker_replication_secret) != _reveal(shared.worker_replication_secret):
        differences.append("worker_replication_secret")
    if config.redis != shared.redis:
        differences.append("redis")
    if differences:
        report.add(
            "fail",
            f"worker {name!r} ({worker_file}): {', '.join(differences)} differ from the shared config",
            "every process must have the same; keep these keys only in the shared file",
        )
    else:
        report.add("ok", f"worker {name!r} ({worker_file}) agrees with the shared config")
    _check_listener(config, read_config_files(*base, worker_file), report)


def _reveal(secret: Any) -> str | None:
    return None if secret is None else str(secret.reveal())


# --- Redis and traffic -----------------------------------------------------------


async def _check_redis_and_traffic(
    reactor: Any, args: argparse.Namespace, config: SynapseConfig, report: _Report
) -> None:
    if not config.redis.enabled:
        report.add("skip", "Redis: not enabled in the config")
        return
    lines: Counter[str] = Counter()
    heard: set[str] = set()

    def on_line(channel: str, line: str) -> None:
        try:
            cmd = parse_line(line)
        except ProtocolError:
            lines["(bad)"] += 1
            return
        lines[cmd.NAME] += 1
        sender = sender_of(cmd)
        if isinstance(cmd, PositionCommand | RdataCommand) and sender:
            heard.add(sender)

    address = redis_address(config.redis)
    try:
        transport = await connect_redis(
            reactor,
            config,
            on_line=on_line,
            timeout=args.connect_timeout,
            publish=not args.passive,
            client_name="synrepl-doctor",
        )
    except RedisUnreachable as e:
        report.add("fail", f"Redis {e.address}: cannot connect: {e.reason}", e.hint)
        report.add("skip", "traffic: needs Redis")
        return
    auth = ", authenticated" if config.redis.password is not None else ""
    db = f", database {config.redis.dbid}" if config.redis.dbid is not None else ""
    report.add("ok", f"Redis {address}: connected{auth}{db}, subscribed to {config.server_name!r}")
    if not args.passive:
        d = transport.publish(config.server_name, encode(ReplicateCommand()))
        d.addErrback(lambda f: None)
    await sleep(reactor, args.listen)
    await transport.stop()
    total = sum(lines.values())
    channel = config.server_name
    if total:
        counts = ", ".join(f"{n} {name}" for name, n in lines.most_common())
        report.add("ok", f"traffic: {total} lines in {args.listen:g} s on {channel!r} ({counts})")
    elif args.passive:
        report.add(
            "warn",
            f"traffic: nothing on {channel!r} in {args.listen:g} s (an idle cluster is quiet)",
            "run without --passive to ask every process for its positions, and check that "
            "server_name is the one the Synapse processes use",
        )
        return
    else:
        report.add(
            "fail",
            f"traffic: no process answered REPLICATE on {channel!r} within {args.listen:g} s",
            f"check that server_name ({channel!r}) is the processes' own, that they run with "
            "redis.enabled: true, and that they use this Redis (host, port)",
        )
        return
    if args.passive:
        return
    expected = set(config.instance_map) | set(config.stream_writers.all_writers())
    for name in sorted(expected, key=_instance_order):
        if name in heard:
            report.add("ok", f"{_map_key(name)} is on the channel (answered REPLICATE)")
        else:
            report.add(
                "fail",
                f"{_map_key(name)} did not answer REPLICATE",
                f"is {_map_key(name)} running? its log says whether it reached Redis; its config "
                "needs redis.enabled: true with this Redis and the same server_name",
            )


# --- HTTP listeners, secret, versions ------------------------------------------------


async def _check_listeners(
    reactor: Any, args: argparse.Namespace, config: SynapseConfig, report: _Report
) -> None:
    if not config.instance_map:
        report.add(
            "skip",
            "replication listeners: instance_map is empty (a single process needs none)",
        )
        return
    versions: dict[str, str] = {}
    for name in sorted(config.instance_map, key=_instance_order):
        location = describe_location(config.instance_map[name])
        probe = ProbeClient(reactor, config, timeout=args.http_timeout)
        try:
            await probe.http.get_repl_stream_updates(name, "caches", 0, 0)
        except Exception as e:  # noqa: BLE001 - every failure becomes one line
            explained = explain_http_failure(
                e, _map_key(name), location, has_secret=config.worker_replication_secret is not None
            )
            report.add("fail", explained.problem, explained.fix)
            continue
        finally:
            await probe.http.close()
        secret = (
            "secret accepted" if config.worker_replication_secret is not None else "no secret set"
        )
        report.add("ok", f"{_map_key(name)} at {location}: replication listener answers, {secret}")
        release = probe.http.releases_seen.get(name)
        if release is None:
            server = probe.server_header or "no Server header"
            report.add(
                "warn",
                f"{_map_key(name)}: cannot tell its Synapse version (Server: {server})",
                "Synapse names itself in the Server header; a proxy in between may replace it",
            )
            continue
        versions[name] = str(release)
        support = support_of(release)
        if support.level == "tested":
            report.add("ok", f"{_map_key(name)} runs {support.text}")
        else:
            report.add(
                "warn",
                f"{_map_key(name)} runs {support.text}",
                "docs/tested-against.md lists what each release changed on the wire; "
                "run synrepl's interop matrix (tests/interop/matrix.py) against this release",
            )
    if len(set(versions.values())) > 1:
        listed = ", ".join(f"{_map_key(n)} {v}" for n, v in versions.items())
        report.add(
            "warn",
            f"instances run different Synapse versions: {listed}",
            "finish the upgrade: every process of a deployment should run the same release",
        )
