"""Helpers for the CLI tests: run ``python -m synrepl.cli`` as a subprocess
on the reactor (so a FakeHomeserver in the test keeps serving meanwhile), or
blocking with a timeout (for input that might hang it), and write config
files for a FakeHomeserver.  No tests here."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from client_helpers import wait_until
from twisted.internet import defer, protocol, reactor
from twisted.python.failure import Failure

from synrepl.testing.homeserver import FakeHomeserver

__all__ = (
    "Cli",
    "start_cli",
    "run_cli",
    "run_synrepl_blocking",
    "limit_memory",
    "write_config",
    "json_lines",
    "kill_leftover_clis",
)

_running: list[Cli] = []


class Cli(protocol.ProcessProtocol):
    """A running ``synrepl`` subprocess and what it printed so far."""

    def __init__(self, args: tuple[str, ...]) -> None:
        self.args = args
        self._out = bytearray()
        self._err = bytearray()
        self.code: int | None = None
        self._ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self._out += data

    def errReceived(self, data: bytes) -> None:
        self._err += data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.code = -1 if code is None else int(code)
        self._ended.callback(self.code)

    @property
    def stdout(self) -> str:
        return self._out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self._err.decode("utf-8", "replace")

    def signal(self, name: str = "INT") -> None:
        if self.code is None:
            self.transport.signalProcess(name)  # type: ignore[union-attr]

    async def wait(self, timeout: float = 30.0) -> int:
        """Wait for the exit; kill it and fail after ``timeout``."""
        try:
            await wait_until(lambda: self.code is not None, timeout=timeout, what="exit")
        except AssertionError:
            self.signal("KILL")
            raise AssertionError(
                f"synrepl {' '.join(self.args)} did not exit in {timeout} s\n"
                f"stdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}"
            ) from None
        assert self.code is not None
        return self.code

    async def wait_for_stderr(self, text: str, timeout: float = 15.0) -> None:
        await wait_until(
            lambda: text in self.stderr or self.code is not None, timeout=timeout, what=text
        )
        assert text in self.stderr, f"exited {self.code}: {self.stderr}"

    def __repr__(self) -> str:
        return f"<synrepl {' '.join(self.args)} code={self.code}>"


def start_cli(*args: str, env: dict[str, str] | None = None) -> Cli:
    """Start ``python -m synrepl.cli ARGS``; stdout and stderr are pipes (not a tty)."""
    cli = Cli(args)
    environment = dict(os.environ)
    environment.pop("NO_COLOR", None)
    environment.update(env or {})
    reactor.spawnProcess(  # type: ignore[attr-defined]
        cli, sys.executable, [sys.executable, "-m", "synrepl.cli", *args], env=environment
    )
    _running.append(cli)
    return cli


@pytest.fixture(autouse=True)
def kill_leftover_clis() -> Any:
    """Import into a test module: kills what a failed test left running."""
    yield
    while _running:
        cli = _running.pop()
        if cli.code is None:
            with contextlib.suppress(Exception):  # already gone
                cli.signal("KILL")


async def run_cli(*args: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> Cli:
    """Run to the end."""
    cli = start_cli(*args, env=env)
    await cli.wait(timeout)
    return cli


def write_config(path: Path, hs: FakeHomeserver, **overrides: Any) -> Path:
    """homeserver.yaml for ``hs``, with its main replication listener declared."""
    data = hs.config_dict()
    data["listeners"] = [
        {
            "port": hs.http_port("master"),
            "type": "http",
            "bind_addresses": ["127.0.0.1"],
            "resources": [{"names": ["replication"]}],
        }
    ]
    data.update(overrides)
    path.write_text(yaml.safe_dump(data))
    return path


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def limit_memory(limit: int) -> Any:
    """A preexec_fn capping the child's address space, so a runaway input
    fails fast instead of swapping a shared machine (None where unsupported)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux/macOS
        return None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_synrepl_blocking(
    *args: str, timeout: float = 20.0, memory: int = 2 << 30
) -> subprocess.CompletedProcess[str]:
    """``python -m synrepl ARGS`` without a reactor, failing the test (not
    hanging it) when the command does not end within ``timeout`` seconds."""
    environment = dict(os.environ)
    environment["NO_COLOR"] = "1"
    try:
        return subprocess.run(
            [sys.executable, "-m", "synrepl", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=environment,
            preexec_fn=limit_memory(memory),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"synrepl {' '.join(args)} did not end within {timeout} s")
