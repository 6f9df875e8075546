"""``synrepl demo``: a simulated homeserver and a watch on it, in one command."""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from synrepl.cli._errors import EXIT_OK, RuntimeFailure, UsageError
from synrepl.cli._options import (
    add_filter_options,
    add_output_options,
    non_negative_int,
    parse_redis_url,
    positive_float,
)
from synrepl.cli._render import Output, Stats, make_console, print_summary
from synrepl.cli._runtime import Session
from synrepl.cli._traffic import DemoTraffic
from synrepl.cli._watcher import LineWatcher
from synrepl.cli.watch import filters_from, redis_address, watch_channel
from synrepl.commands import Command, encode
from synrepl.config import RedisConfig, SynapseConfig
from synrepl.connection import TransportOptions
from synrepl.testing.homeserver import FakeHomeserver
from synrepl.twisted.redis_transport import RedisTransport

__all__ = ("add_parser", "run", "DEMO_SERVER_NAME")

#: The demo's channel: a name no real homeserver has (.local is never delegated).
DEMO_SERVER_NAME = "demo.synrepl.local"

DESCRIPTION = f"""\
See synrepl at work in one command: a simulated homeserver (synrepl.testing's
FakeHomeserver: a main process, two event persisters, a sync worker and a
federation sender) writes a realistic mix of replication traffic (events with
their state rows in a few rooms, typing, receipts, presence, to-device
messages, account data, caches, USER_SYNC, USER_IP, ...) on Redis, and a
`synrepl watch` prints it, decoded.

Redis: the one on 127.0.0.1:6379 if it answers; otherwise, when redis-server
is installed, a private one started for the demo on a free port (stopped
afterwards); or the one given with --redis-url.  The demo publishes on the
channel '{DEMO_SERVER_NAME}', which no real homeserver uses, so it never
disturbs a real cluster on the same Redis.
"""

EPILOG = """\
examples:
  synrepl demo
  synrepl demo --duration 20
  synrepl demo --json --duration 5 | jq .
  synrepl demo --stream events --rate 10
  synrepl demo --redis-url redis://127.0.0.1:6380

exit status: 0 stopped normally (Ctrl-C, --duration); 1 no Redis could be
found or started; 2 bad usage.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="simulated homeserver + live decoded traffic (start here)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--duration", metavar="SECONDS", type=positive_float, help="stop after this long"
    )
    parser.add_argument(
        "--rate",
        metavar="N",
        type=positive_float,
        default=3.0,
        help="simulated actions per second (default: 3)",
    )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help="the Redis to use (default: 127.0.0.1:6379, or a private redis-server)",
    )
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        default=DEMO_SERVER_NAME,
        help=f"the simulated homeserver's name and channel (default: {DEMO_SERVER_NAME})",
    )
    parser.add_argument("--seed", metavar="N", type=non_negative_int, help="repeatable traffic")
    parser.add_argument(
        "--connect-timeout",
        metavar="SECONDS",
        type=positive_float,
        default=10.0,
        help="give up when Redis does not answer within this time (default: 10)",
    )
    add_filter_options(parser)
    add_output_options(parser)
    parser.set_defaults(run=run)
    return parser


def _ping(host: str, port: int, timeout: float = 0.5) -> str:
    """``"ok"``, ``"auth"`` (wants a password) or ``"none"``: is a Redis there?"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            answer = s.recv(64)
    except OSError:
        return "none"
    if answer.startswith(b"+PONG"):
        return "ok"
    if answer.startswith(b"-NOAUTH") or b"auth" in answer.lower():
        return "auth"
    return "none"


class _PrivateRedis:
    """A redis-server for the demo alone: free port, no persistence, own session."""

    def __init__(self) -> None:
        self.directory = tempfile.TemporaryDirectory(prefix="synrepl-demo-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        # A session of its own: the terminal's Ctrl-C must not kill it before we stop.
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                self.directory.name,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while _ping("127.0.0.1", self.port) != "ok":
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeFailure("could not start redis-server for the demo")
            time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.directory.cleanup()


def _find_redis(url: str | None) -> tuple[RedisConfig, _PrivateRedis | None]:
    if url:
        redis = parse_redis_url(url)
        if redis.path or redis.password is not None or redis.use_tls or redis.dbid:
            raise UsageError(
                "the demo's simulated homeserver needs a plain TCP Redis without a password; "
                "pass --redis-url redis://host:port"
            )
        return redis, None
    state = _ping("127.0.0.1", 6379)
    if state == "ok":
        return RedisConfig(enabled=True, host="127.0.0.1", port=6379), None
    if shutil.which("redis-server") is None:
        why = "wants a password" if state == "auth" else "does not answer"
        raise RuntimeFailure(
            f"Redis on 127.0.0.1:6379 {why}, and redis-server is not installed to start one: "
            "install Redis (apt install redis-server, dnf install redis, brew install redis) "
            "or pass --redis-url redis://[:password@]host:port"
        )
    private = _PrivateRedis()
    return RedisConfig(enabled=True, host="127.0.0.1", port=private.port), private


async def run(reactor: Any, args: argparse.Namespace) -> int:
    if not args.server_name:
        raise UsageError("--server-name must not be empty")
    filters = filters_from(args)
    redis, private = _find_redis(args.redis_url)
    try:
        return await _demo(reactor, args, redis, filters, private is not None)
    finally:
        if private is not None:
            private.close()


async def _demo(
    reactor: Any, args: argparse.Namespace, redis: RedisConfig, filters: Any, private: bool
) -> int:
    session = Session(reactor, duration=args.duration)
    stats = Stats()
    output = Output(
        json_mode=args.json, color=args.color, on_closed=lambda: session.stop("output closed")
    )
    watcher = LineWatcher(output, filters, stats, show_access_tokens=args.show_access_tokens)
    config = SynapseConfig(server_name=args.server_name, redis=redis)
    watch = await watch_channel(
        reactor, config, watcher.on_line, stats, replicate=False, timeout=args.connect_timeout
    )
    persisters = ["event_persister1", "event_persister2"]
    hs = FakeHomeserver(
        reactor,
        server_name=args.server_name,
        writers=("master", *persisters),
        redis_host=redis.host,
        redis_port=redis.port,
    )
    await hs.start()
    worker = _WorkerPublisher(reactor, config)
    await worker.start()
    rng = random.Random(args.seed)
    traffic = DemoTraffic(hs, persisters, worker.publish, rng)
    err = make_console(args.color, stderr=True)
    where = f"a private redis-server on {redis_address(redis)}" if private else redis_address(redis)
    err.print(
        f"synrepl demo: simulated homeserver {args.server_name!r} (master, {', '.join(persisters)}, "
        f"a sync worker and a federation sender) on Redis {where}; decoded traffic below. "
        "Ctrl-C to stop.",
        style="bold",
    )
    traffic.setup()
    loop = LoopingCall(traffic.step)
    loop.clock = reactor
    loop.start(1.0 / args.rate, now=False)
    await session.wait()
    loop.stop()
    await worker.stop()
    await hs.stop()
    await watch.stop()
    watcher.finish()
    print_summary(err, "synrepl demo", stats)
    err.print(
        "next: look at your own cluster, read-only: synrepl watch -c /etc/synapse/homeserver.yaml "
        "(see synrepl --help)",
        style="dim",
    )
    return EXIT_OK


class _WorkerPublisher:
    """The simulated sync worker's and federation sender's Redis connection."""

    def __init__(self, reactor: Any, config: SynapseConfig) -> None:
        self._server_name = config.server_name
        self._ready: defer.Deferred[None] = defer.Deferred()
        self._transport = RedisTransport(
            reactor,
            config.redis,
            [f"{config.server_name}/demo-worker"],
            on_line=lambda channel, line: None,
            on_subscribed=self._subscribed,
            on_connection_lost=lambda: None,
            options=TransportOptions(client_name="synrepl-demo-worker"),
        )

    def _subscribed(self) -> None:
        if not self._ready.called:
            self._ready.callback(None)

    async def start(self) -> None:
        self._transport.start()
        await self._ready

    def publish(self, cmd: Command) -> None:
        try:
            d = self._transport.publish(cmd.channel(self._server_name), encode(cmd))
        except Exception:  # noqa: BLE001 - a lost demo message does not matter
            return
        d.addErrback(lambda f: None)

    async def stop(self) -> None:
        await self._transport.stop()
