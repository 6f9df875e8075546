"""``synrepl watch`` against ``redis-cli subscribe`` on the same traffic (a benchmark).

    python benchmarks/bench_watch.py [--rounds 5] [--repeat 2] [--baseline DIR]

The repository's corpus (both files, tokens renumbered, see
_replay.py; its main channel and its ``/USER_IP`` channel) is
published into a private redis-server, pipelined with redis-py, one
consumer subscribed at a time, in two ways (``--method``):

* ``live``: while the consumer listens, timed from the first PUBLISH: the
  rate at which it keeps up with a fast publisher (redis-cli's is about the
  publisher's);
* ``backlog``: while the consumer is stopped (SIGSTOP), so the messages wait
  in Redis's output buffer, timed from SIGCONT: the rate at which it drains
  them, with nothing else to wait for.

Each consumer's stdout is a pipe into a small counting reader (this file,
``--count``), which notes the moment it has counted every message: for
``redis-cli`` (raw output, three lines a message) the ``message`` lines,
for ``watch`` every line (one record a message; how many is worked out
beforehand by running watch's own line printer over the same messages).
The consumers:

* ``redis-cli subscribe CHANNEL...`` -- the baseline of the ratios;
* ``synrepl watch --json`` and ``synrepl watch`` (text, no colour: stdout is
  a pipe), subscribed with ``--server-name`` and ``--redis-url`` alone;
* with ``--baseline DIR``, the same two from the ``synrepl`` package in DIR
  (DIR put first on PYTHONPATH), to compare two trees in one run.

Rounds are interleaved (every consumer once per round, the order rotated);
medians, the spread (min-max) and the ratios to redis-cli are printed.  This
is a benchmark, not a test: it asserts nothing about time, only that every
consumer received every message.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

import attrs
from _replay import Entries, PrivateRedis, corpus_segments, renumbered

from synrepl.cli._render import Filters, Output, Stats
from synrepl.cli._watcher import LineWatcher

#: The server_name the corpus was captured on: its channels' names.
SERVER_NAME = "test.local"

#: Seconds a consumer gets to subscribe, to drain the backlog, or to exit.
_TIMEOUT = 120.0

#: What redis-cli prints (raw, stdout not a terminal) before each message's channel.
_MESSAGE = b"\nmessage\n"


# --- the counting reader (a process of its own) ---------------------------------------------


def count_main(mode: str, target: int) -> int:
    """Count stdin's records; print ``reached <monotonic>`` once there are
    ``target``, then ``total <n>`` at end of input."""
    stdin = sys.stdin.buffer.raw  # type: ignore[attr-defined]
    count = 0
    tail = b"\n"  # redis-cli's first line is a subscribe reply, so every message follows "\n"
    reached = False
    while chunk := stdin.read(1 << 20):
        if mode == "messages":
            data = tail + chunk
            count += data.count(_MESSAGE)
            tail = data[-(len(_MESSAGE) - 1) :]  # too short to hold a whole match again
        else:
            count += chunk.count(b"\n")
        if not reached and count >= target:
            reached = True
            print(f"reached {time.monotonic()!r}", flush=True)
    print(f"total {count}", flush=True)
    return 0


# --- the expected count ---------------------------------------------------------------------


class _CountingOutput(Output):
    """An Output that only counts what watch would print."""

    def __init__(self) -> None:
        super().__init__(json_mode=True, file=open(os.devnull, "w"))  # noqa: SIM115
        self.count = 0

    def emit(self, record: Mapping[str, Any]) -> None:
        self.count += 1


def watch_counts(entries: Entries) -> tuple[int, int]:
    """How many records watch prints for ``entries``: while running, and in
    all (rows of batches still open at the end come out on exit)."""
    output = _CountingOutput()
    watcher = LineWatcher(output, Filters(), Stats())
    for channel, line in entries:
        watcher.on_line(channel, line)
    live = output.count
    watcher.finish()
    return live, output.count


# --- one run --------------------------------------------------------------------------------


@attrs.frozen
class Consumer:
    """A command that subscribes and prints, and how its output is counted."""

    label: str
    argv: list[str]
    mode: str  # "messages" (redis-cli) or "lines" (watch)
    env: dict[str, str] | None = None


def _wait_subscribed(server: PrivateRedis, channels: Sequence[str], process: Any) -> None:
    """Until exactly one client (``process``) listens on every channel."""
    deadline = time.monotonic() + _TIMEOUT
    while True:
        counts = dict(server.client.pubsub_numsub(*channels))
        if all(counts.get(c.encode(), 0) == 1 for c in channels):
            return
        if process.poll() is not None:
            raise RuntimeError(f"the consumer exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not subscribed within {_TIMEOUT:g} s: {counts}")
        time.sleep(0.02)


def _reader_line(stream: IO[str], word: str) -> str:
    line = stream.readline()
    if not line.startswith(word + " "):
        raise RuntimeError(f"the counting reader said {line!r}, not {word!r}")
    return line.split()[1]


def run_once(
    server: PrivateRedis,
    consumer: Consumer,
    channels: Sequence[str],
    entries: Entries,
    expected: tuple[int, int],
    method: str,
) -> float:
    """Seconds ``consumer`` takes to print all of ``entries``: published while
    it was stopped, from SIGCONT (``backlog``), or from the first PUBLISH
    while it listens (``live``)."""
    live, total = expected
    read_end, write_end = os.pipe()
    counter = subprocess.Popen(
        [sys.executable, __file__, "--count", consumer.mode, str(live)],
        stdin=read_end,
        stdout=subprocess.PIPE,
        text=True,
    )
    os.close(read_end)
    env = dict(os.environ)
    env.pop("NO_COLOR", None)
    env.pop("PYTHONUNBUFFERED", None)  # stdout as Python sets it up by default
    env.update(consumer.env or {})
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            consumer.argv,
            stdout=write_end,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=tempfile.gettempdir(),  # not the checkout: PYTHONPATH decides for --baseline
        )
        os.close(write_end)
        try:
            _wait_subscribed(server, channels, process)
            if method == "backlog":
                process.send_signal(signal.SIGSTOP)
                server.publish(entries)  # each message reached exactly one subscriber
                start = time.monotonic()
                process.send_signal(signal.SIGCONT)
            else:
                start = time.monotonic()
                server.publish(entries)
            assert counter.stdout is not None
            ready, _, _ = select.select([counter.stdout], [], [], _TIMEOUT)
            reached = float(_reader_line(counter.stdout, "reached")) if ready else None
            process.send_signal(signal.SIGINT if consumer.mode == "lines" else signal.SIGTERM)
            process.wait(_TIMEOUT)
            counted = int(_reader_line(counter.stdout, "total"))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            counter.kill()
            counter.wait()
        if counted != total or reached is None:
            stderr.seek(0)
            raise RuntimeError(
                f"{consumer.label}: {counted:,} of {total:,} records arrived\n{stderr.read()[-2000:]}"
            )
    return reached - start


# --- the report -----------------------------------------------------------------------------


def consumers(port: int, channels: Sequence[str], baseline: str | None) -> list[Consumer]:
    watch = [sys.executable, "-m", "synrepl", "watch", "--server-name", SERVER_NAME]
    watch += ["--redis-url", f"redis://127.0.0.1:{port}"]
    redis_cli = shutil.which("redis-cli") or "redis-cli"
    out = [
        Consumer("redis-cli subscribe", [redis_cli, "-p", str(port), "subscribe", *channels], "messages"),
        Consumer("synrepl watch --json", [*watch, "--json"], "lines"),
        Consumer("synrepl watch (text)", watch, "lines"),
    ]  # fmt: skip
    if baseline:
        env = {
            "PYTHONPATH": os.pathsep.join(filter(None, [baseline, os.environ.get("PYTHONPATH")]))
        }
        out += [
            Consumer("baseline watch --json", [*watch, "--json"], "lines", env),
            Consumer("baseline watch (text)", watch, "lines", env),
        ]  # fmt: skip
    return out


def report(method: str, times: Mapping[str, list[float]], messages: int) -> None:
    """Medians, spreads and ratios to the first consumer (redis-cli)."""
    labels = list(times)
    base = times[labels[0]]
    print(f"{method}: {_METHODS[method]}")
    print(f"  {'consumer':<24} {'median msg/s':>12} {'spread (min-max)':>23}  vs redis-cli")
    for label in labels:
        seconds = times[label]
        rates = sorted(messages / s for s in seconds)
        median = statistics.median(seconds)
        per_round = statistics.median(b / s for b, s in zip(base, seconds, strict=True))
        print(
            f"  {label:<24} {messages / median:>12,.0f} {rates[0]:>11,.0f}-{rates[-1]:<11,.0f}"
            f"  {statistics.median(base) / median:.2f}x (per round: median {per_round:.2f}x)"
        )


_METHODS = {
    "live": "published while each consumer listens, timed from the first PUBLISH",
    "backlog": "published while each consumer is stopped, timed from SIGCONT",
}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=2, help="copies of the corpus published")
    ap.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    ap.add_argument("--method", choices=(*_METHODS, "both"), default="both", help="how it is timed")
    ap.add_argument(
        "--baseline", metavar="DIR", help="also run watch from the synrepl package in DIR"
    )
    args = ap.parse_args(argv)
    methods = list(_METHODS) if args.method == "both" else [args.method]
    entries = renumbered(corpus_segments(), args.repeat)
    if any("\n" in line for _, line in entries):
        raise RuntimeError("a message holds a newline: redis-cli's output cannot be counted")
    channels = sorted({channel for channel, _ in entries})
    if channels != [SERVER_NAME, f"{SERVER_NAME}/USER_IP"]:
        raise RuntimeError(f"unexpected channels {channels}")
    expected_watch = watch_counts(entries)
    print(
        f"{len(entries):,} messages on {', '.join(channels)} ({expected_watch[0]:,} records "
        f"from watch while running, {expected_watch[1]:,} in all); Python "
        f"{sys.version.split()[0]}; {args.rounds} interleaved rounds"
    )
    server = PrivateRedis(args.redis_server)
    try:
        candidates = consumers(server.port, channels, args.baseline)
        times = {m: {c.label: [] for c in candidates} for m in methods}
        for n in range(args.rounds):
            shift = n % len(candidates)
            for consumer in candidates[shift:] + candidates[:shift]:
                expected = (
                    (len(entries), len(entries)) if consumer.mode == "messages" else expected_watch
                )
                for method in methods:
                    seconds = run_once(server, consumer, channels, entries, expected, method)
                    times[method][consumer.label].append(seconds)
    finally:
        server.close()
    for method in methods:
        report(method, times[method], len(entries))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--count"]:
        raise SystemExit(count_main(sys.argv[2], int(sys.argv[3])))
    raise SystemExit(main())
