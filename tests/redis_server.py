"""A private redis-server for tests that kill, restart or pause Redis.

Each :class:`RedisServer` runs its own ``redis-server`` process (no
persistence, no daemonizing) on a free TCP port, a unix socket, or a TLS
port, in a temporary directory.  :meth:`RedisServer.kill` and
:meth:`RedisServer.start` bring it down and back on the same address;
:meth:`RedisServer.client` is a redis-py client that drives it (CLIENT KILL,
CLIENT PAUSE, CONFIG SET, PUBLISH, ...).  Never point these tests at a shared
Redis: they disturb every client connected to it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import attrs
import redis

from synrepl.config import RedisConfig, Secret

__all__ = ("RedisServer", "TlsFiles", "redis_server_available", "free_port")

_START_TIMEOUT = 10.0


def redis_server_available() -> bool:
    """True when a ``redis-server`` executable is on PATH."""
    return shutil.which("redis-server") is not None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ExitedError(RuntimeError):
    """redis-server exited while starting (a taken port, a bad option)."""


@attrs.frozen
class TlsFiles:
    """PEM files for a TLS redis-server and its clients."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


class RedisServer:
    """One redis-server process for one test.

    Args:
        directory: where the socket, the log and Redis's working files go.
        password: ``requirepass``, if any.
        unix_socket: listen on ``<directory>/redis.sock`` only (no TCP).
        tls: listen with TLS only, requiring a client certificate.
    """

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        unix_socket: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        self.directory = directory
        self.password = password
        self.tls = tls
        self.socket_path: Path | None = directory / "redis.sock" if unix_socket else None
        self.port = 0 if unix_socket else free_port()
        self.log_file = directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []
        self._started = False

    # --- lifecycle -------------------------------------------------------------

    def _args(self) -> list[str]:
        args = ["redis-server", "--save", "", "--appendonly", "no", "--daemonize", "no"]
        args += ["--dir", str(self.directory), "--logfile", str(self.log_file)]
        args += ["--bind", "127.0.0.1"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.socket_path is not None:
            args += ["--port", "0", "--unixsocket", str(self.socket_path)]
            args += ["--unixsocketperm", "700"]
        elif self.tls is not None:
            args += ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(self.tls.server_cert)]
            args += ["--tls-key-file", str(self.tls.server_key)]
            args += ["--tls-ca-cert-file", str(self.tls.ca_file)]
            args += ["--tls-auth-clients", "yes"]
        else:
            args += ["--port", str(self.port)]
        return args

    def start(self) -> None:
        """Start (or restart) the server on its address; return once it answers PING.

        The first start picks another port if the free one was taken meanwhile
        (tests run in parallel); a restart keeps the port.
        """
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError("redis-server is already running")
        tries = 1 if self._started or self.socket_path is not None else 3
        for attempt in range(tries):
            try:
                self._start_once()
            except _ExitedError:
                if attempt == tries - 1:
                    raise
                self.port = free_port()
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
        probe = self.client(register=False)
        try:
            while True:
                if self._process.poll() is not None:
                    raise _ExitedError(f"redis-server exited at start:\n{self.log()}")
                try:
                    if probe.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING:\n{self.log()}")
                time.sleep(0.02)
        finally:
            probe.close()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        for client in self._clients:
            client.close()
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    # --- access ------------------------------------------------------------------

    def client(self, *, register: bool = True, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server (authenticated, TLS, socket as needed)."""
        options: dict[str, Any] = {"password": self.password, "socket_timeout": 5}
        if self.socket_path is not None:
            options["unix_socket_path"] = str(self.socket_path)
        else:
            options.update(host="127.0.0.1", port=self.port)
        if self.tls is not None:
            options.update(
                ssl=True,
                ssl_certfile=str(self.tls.client_cert),
                ssl_keyfile=str(self.tls.client_key),
                ssl_ca_certs=str(self.tls.ca_file),
            )
        options.update(kwargs)
        client = redis.Redis(**options)
        if register:
            self._clients.append(client)
        return client

    def redis_config(self, **overrides: Any) -> RedisConfig:
        """A RedisConfig pointing at this server; ``password`` may be a plain str."""
        fields: dict[str, Any] = {"enabled": True}
        if self.socket_path is not None:
            fields["path"] = str(self.socket_path)
        else:
            fields.update(host="127.0.0.1", port=self.port)
        if self.password is not None:
            fields["password"] = Secret(self.password)
        if self.tls is not None:
            fields.update(
                use_tls=True,
                certificate_file=str(self.tls.client_cert),
                private_key_file=str(self.tls.client_key),
                ca_file=str(self.tls.ca_file),
            )
        if isinstance(overrides.get("password"), str):
            overrides["password"] = Secret(overrides["password"])
        fields.update(overrides)
        return RedisConfig(**fields)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
