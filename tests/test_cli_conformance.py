"""``synrepl conformance`` against processes of known behaviour, each on a
redis-server of its own: one that keeps every rule passes; one per rule that
breaks exactly that rule fails, and the report names it with its line.

The real Synapse worker's turn is in tests/interop/test_conformance.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conformance_subjects import GOOD, MODES
from redis_server import RedisServer

from synrepl.cli.conformance import GARBAGE
from synrepl.commands import parse_line
from synrepl.conformance import RULES
from synrepl.errors import ProtocolError

CHANNEL = "subject.test"
SUBJECTS = Path(__file__).with_name("conformance_subjects.py")
FAST = ("--replicate-within", "1", "--garbage-grace", "1", "--wait", "20")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


def conformance(port: int, *args: str, mode: str | None = None) -> tuple[int, dict[str, Any], str]:
    """Run the check; with ``mode``, start that subject once the check watches."""
    check = subprocess.Popen(
        [sys.executable, "-m", "synrepl", "conformance", "--server-name", CHANNEL,
         "--redis-url", f"redis://127.0.0.1:{port}", "--json", *FAST, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc = None
    try:
        if mode is not None:
            with redis.Redis(port=port) as client:
                wait_until_sync(
                    lambda: (
                        any(c["cmd"] == "monitor" for c in client.client_list())
                        or check.poll() is not None
                    ),
                    what="the check's MONITOR",
                )
            env = {**os.environ, "PYTHONPATH": str(SUBJECTS.parent)}
            proc = subprocess.Popen(
                [sys.executable, str(SUBJECTS), str(port), CHANNEL, mode], env=env
            )
        stdout, stderr = check.communicate(timeout=120)
    finally:
        check.kill()
        if proc is not None:
            proc.kill()
            proc.wait()
    report = json.loads(stdout) if stdout.strip() else {}
    return check.returncode, report, stderr


def wait_until_sync(condition: Callable[[], bool], *, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def by_rule(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["rule"]: r for r in report["rules"]}


@pytest.mark.parametrize("mode", MODES)
def test_each_broken_rule_is_named_and_a_conforming_subject_passes(
    redis_server: RedisServer, mode: str
) -> None:
    """The check starts first and the subject after it, as a user would run it."""
    code, report, stderr = conformance(redis_server.port, mode=mode)
    rules = by_rule(report)
    failed = {name for name, r in rules.items() if r["status"] == "failed"}
    if mode == GOOD:
        assert (code, failed) == (0, set()), stderr
        # Every rule a subscriber alone can exercise was exercised.
        exercised = {name for name, r in rules.items() if r["status"] == "passed"}
        assert exercised == set(RULES) - {"federation-ack-not-ahead"}, report
    else:
        assert code == 3, stderr
        assert failed == {mode}, report
        assert rules[mode]["why"]


def test_the_line_that_broke_a_rule_is_quoted(redis_server: RedisServer) -> None:
    code, report, _ = conformance(redis_server.port, mode="worker-commands")
    rule = by_rule(report)["worker-commands"]
    assert rule["line"] == "POSITION events subject1 1 2"
    assert rule["why"] == "POSITION for events, a stream it does not write"
    # The same line is allowed from a process that writes events.
    code, report, _ = conformance(
        redis_server.port, "--writes", "events,caches", mode="worker-commands"
    )
    assert code == 0, report


def test_nobody_subscribed_is_a_runtime_failure(redis_server: RedisServer) -> None:
    code, _, stderr = conformance(redis_server.port, "--wait", "0.5")
    assert code == 1
    assert f"no client subscribed to {CHANNEL!r} within 0.5 s" in stderr


def test_an_unknown_stream_is_a_usage_error(redis_server: RedisServer) -> None:
    code, _, stderr = conformance(redis_server.port, "--writes", "nonsense")
    assert code == 2
    assert "--writes: no such stream: nonsense" in stderr


@pytest.mark.parametrize("line", GARBAGE)
def test_the_garbage_is_garbage_to_synapse_and_to_synrepl(line: str) -> None:
    """Synapse's own parser refuses every line, as synrepl's does: a process
    that drops its connection over one of them has no excuse."""
    from synapse.replication.tcp.commands import parse_command_from_line

    with pytest.raises(ProtocolError):
        parse_line(line)
    with pytest.raises(Exception):  # noqa: B017 - Synapse raises several kinds
        parse_command_from_line(line)


def test_the_scripted_homeserver_announces_only_its_release_streams() -> None:
    """A process of an older release fails on a stream it does not know
    (Synapse 1.98.0's worker raised KeyError on profile_updates): told the
    release, the simulated writers never announce such a stream."""
    from synrepl.releases import SynapseRelease, facts_for
    from synrepl.testing.writers import SimulatedWriters

    class Heard(SimulatedWriters):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.lines: list[str] = []

        def _publish(self, line: str) -> None:
            self.lines.append(line)

    def announced(release: SynapseRelease | None) -> set[str]:
        homeserver = Heard(writers=("master",), release=release)
        homeserver._on_line("test.local", "REPLICATE")
        return {line.split()[1] for line in homeserver.lines if line.startswith("POSITION ")}

    old = SynapseRelease.parse("1.98.0")
    assert announced(old) == (announced(None) & facts_for(old).streams)
    assert "profile_updates" in announced(None) and "profile_updates" not in announced(old)
