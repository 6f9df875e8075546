"""A private nats-server for tests that kill, restart or refuse JetStream.

Each :class:`NatsServer` runs its own ``nats-server -js -a 127.0.0.1 -p PORT
-sd DIR`` process (Debian's ``nats-server``) on a free loopback port, with
its JetStream store in a directory of its own.  :meth:`NatsServer.kill`
(SIGKILL, a crash) or :meth:`NatsServer.stop` (SIGTERM, a clean shutdown)
and :meth:`NatsServer.start` bring it down and back on the same port and
store, so the streams (and their de-duplication windows) survive.  With
``jetstream=False`` it is a plain NATS server (no ``-js``), for the sink's
"no JetStream here" error.  With ``monitor=True`` it serves its monitoring
endpoints too (``-m``), and :meth:`NatsServer.connections` counts the
clients connected.  Modelled on :mod:`redis_server`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Self

from redis_server import free_port

__all__ = ("NatsServer", "nats_server_available")

_START_TIMEOUT = 20.0


def nats_server_available() -> bool:
    """True when a ``nats-server`` executable is on PATH.  Under CI (``CI``
    set) it must be: .ci/run installs it, so its absence is a failure, not
    a reason to skip the JetStream tests."""
    if shutil.which("nats-server") is not None:
        return True
    if os.environ.get("CI"):
        raise RuntimeError("nats-server is not installed, but .ci/run installs it under CI")
    return False


class _ExitedError(RuntimeError):
    """nats-server exited while starting (a taken port, a bad option)."""


class NatsServer:
    """One nats-server process for one test (or one module).

    Args:
        directory: where the store (``store/``) and the log go.
        jetstream: run with ``-js`` (the default); False for plain NATS.
        monitor: serve the HTTP monitoring endpoints on a port of their own.
    """

    def __init__(self, directory: Path, *, jetstream: bool = True, monitor: bool = False) -> None:
        self.directory = directory
        self.jetstream = jetstream
        self.monitor_port = free_port() if monitor else None
        self.store = directory / "store"
        self.log_file = directory / "nats-server.log"
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # --- lifecycle -------------------------------------------------------------

    def _args(self) -> list[str]:
        args = ["nats-server", "-a", "127.0.0.1", "-p", str(self.port)]
        args += ["-l", str(self.log_file)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store)]
        if self.monitor_port is not None:
            args += ["-m", str(self.monitor_port)]
        return args

    def start(self) -> None:
        """Start (or restart) on the same port and store; return once the
        server accepts connections (and, with ``-js``, announces JetStream).

        The first start picks another port if the free one was taken
        meanwhile (tests run in parallel); a restart keeps the port.
        """
        if self.running():
            raise RuntimeError("nats-server is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        tries = 1 if self._started else 3
        for attempt in range(tries):
            try:
                self._start_once()
            except _ExitedError:
                if attempt == tries - 1:
                    raise
                self.port = free_port()
                if self.monitor_port is not None:
                    self.monitor_port = free_port()
            else:
                self._started = True
                return

    def _start_once(self) -> None:
        self._process = subprocess.Popen(
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._ready():
            if self._process.poll() is not None:
                raise _ExitedError(f"nats-server exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                self._process.kill()
                self._process.wait(timeout=10)
                raise RuntimeError(f"nats-server not ready after {_START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        """The server answered a connection with its INFO line (with
        ``"jetstream": true`` when it should have JetStream)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                line = s.makefile("rb").readline()
        except OSError:
            return False
        if not line.startswith(b"INFO "):
            return False
        info = json.loads(line[5:])
        return not self.jetstream or bool(info.get("jetstream"))

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it lingers."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()

    def connections(self) -> int:
        """How many clients are connected now (``/connz``; needs ``monitor=True``)."""
        if self.monitor_port is None:
            raise RuntimeError("start the NatsServer with monitor=True to count connections")
        url = f"http://127.0.0.1:{self.monitor_port}/connz"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(json.load(reply)["num_connections"])

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
