"""Helpers for the CLI tests: run ``python -m synrepl.cli`` as a subprocess
on the reactor (so a FakeHomeserver in the test keeps serving meanwhile), or
blocking with a timeout (for input that might hang it), write config
files for a FakeHomeserver, and give its events content for ``watch --full``:
a SQLite file laid out like Synapse's (:class:`SynapseDb`) and an admin API
(:class:`FakeAdminApi`).  No tests here."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml
from client_helpers import wait_until
from twisted.internet import defer, protocol, reactor
from twisted.python.failure import Failure
from twisted.web import resource, server

from synrepl.streams import EventRow
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
    "SynapseDb",
    "FakeAdminApi",
    "write_event",
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


# Only the tables and columns synrepl's event sources read, as Synapse 1.163.2 names them.
_SCHEMA = """
CREATE TABLE events (stream_ordering INTEGER PRIMARY KEY, event_id TEXT, room_id TEXT,
                     type TEXT, outlier BOOL, sender TEXT, instance_name TEXT);
CREATE TABLE event_json (event_id TEXT, room_id TEXT, internal_metadata TEXT, json TEXT,
                         format_version INTEGER);
CREATE TABLE rooms (room_id TEXT PRIMARY KEY, room_version TEXT);
CREATE TABLE rejections (event_id TEXT, reason TEXT, last_check TEXT);
CREATE TABLE redactions (event_id TEXT, redacts TEXT, have_censored BOOL DEFAULT 0,
                         received_ts BIGINT, recheck BOOL DEFAULT 1);
CREATE TABLE room_ban_redactions (room_id TEXT, user_id TEXT, redacting_event_id TEXT,
                                  redact_end_ordering BIGINT);
CREATE TABLE stream_positions (stream_name TEXT, instance_name TEXT, stream_id BIGINT);
CREATE TABLE current_state_delta_stream (stream_id BIGINT, room_id TEXT, type TEXT,
                                         state_key TEXT, event_id TEXT, instance_name TEXT);
CREATE TABLE ex_outlier_stream (event_stream_ordering BIGINT, event_id TEXT,
                                state_group BIGINT, instance_name TEXT);
"""


class SynapseDb:
    """A SQLite file in WAL mode laid out like Synapse's, holding the content
    of the events a FakeHomeserver announces (see :func:`write_event`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.executescript(_SCHEMA)
        #: event ID -> the event as the admin API would give it.
        self.pdus: dict[str, dict[str, Any]] = {}
        self._rooms: set[str] = set()

    def close(self) -> None:
        self.conn.close()

    def event(
        self,
        token: int,
        event_id: str,
        room_id: str,
        type: str,
        sender: str,
        content: dict[str, Any],
        *,
        state_key: str | None = None,
        writer: str = "master",
    ) -> None:
        """Persist an event at ``token`` of the events stream, as ``writer`` would."""
        if room_id not in self._rooms:
            self._rooms.add(room_id)
            self.conn.execute("INSERT INTO rooms VALUES (?, '10')", (room_id,))
        pdu: dict[str, Any] = {
            "type": type,
            "room_id": room_id,
            "sender": sender,
            "content": content,
            "origin_server_ts": 1_700_000_000_000 + token,
            "unsigned": {"age_ts": 1_700_000_000_000},
            "depth": token,
        }
        if state_key is not None:
            pdu["state_key"] = state_key
        self.conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, 0, ?, ?)",
            (token, event_id, room_id, type, sender, writer),
        )
        self.conn.execute(
            "INSERT INTO event_json VALUES (?, ?, '{}', ?, 3)",
            (event_id, room_id, json.dumps(pdu)),
        )
        self.conn.execute("DELETE FROM stream_positions WHERE instance_name = ?", (writer,))
        self.conn.execute("INSERT INTO stream_positions VALUES ('events', ?, ?)", (writer, token))
        self.pdus[event_id] = {**pdu, "event_id": event_id}


def write_event(
    hs: FakeHomeserver,
    db: SynapseDb,
    event_id: str,
    room_id: str,
    sender: str,
    content: dict[str, Any],
    *,
    type: str = "m.room.message",
    state_key: str | None = None,
    writer: str = "master",
) -> int:
    """Persist an event in ``db``, then announce its row on ``hs``; its token."""
    token = hs.token("events") + 1
    db.event(token, event_id, room_id, type, sender, content, state_key=state_key, writer=writer)
    row = EventRow(event_id, room_id, type, state_key, None, None, None, False, False)
    written = hs.write("events", [row], writer=writer)
    assert written == token
    return token


class FakeAdminApi(resource.Resource):
    """Synapse's ``fetch_event`` and room admin endpoints over the events of
    a :class:`SynapseDb`, for a server admin's ``token`` only."""

    isLeaf = True

    def __init__(self, db: SynapseDb, token: str) -> None:
        super().__init__()
        self._db = db
        self._token = token
        self._port: Any = None
        #: Paths asked for, in order.
        self.requests: list[str] = []

    def listen(self) -> str:
        """Serve on a free loopback port; the base URL."""
        self._port = reactor.listenTCP(  # type: ignore[attr-defined]
            0, server.Site(self), interface="127.0.0.1"
        )
        return f"http://127.0.0.1:{self._port.getHost().port}"

    async def stop(self) -> None:
        if self._port is not None:
            await self._port.stopListening()

    def render_GET(self, request: server.Request) -> bytes:
        path = unquote(request.path.decode())
        self.requests.append(path)
        request.setHeader(b"content-type", b"application/json")
        if request.getHeader("authorization") != f"Bearer {self._token}":
            request.setResponseCode(403)
            return b'{"errcode": "M_FORBIDDEN", "error": "You are not a server admin"}'
        fetch, rooms = "/_synapse/admin/v1/fetch_event/", "/_synapse/admin/v1/rooms/"
        if path.startswith(fetch) and path[len(fetch) :] in self._db.pdus:
            return json.dumps({"event": self._db.pdus[path[len(fetch) :]]}).encode()
        if path.startswith(rooms):
            return json.dumps({"room_id": path[len(rooms) :], "version": "10"}).encode()
        request.setResponseCode(404)
        return b'{"errcode": "M_NOT_FOUND", "error": "Event not found"}'
