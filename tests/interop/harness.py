"""Real Synapse processes for the interop suite: configs, start-up, logs, teardown.

Everything here is blocking and runs outside the reactor (fixture set-up) or
in a thread (``deferToThread``) when a test restarts a process mid-run.

- :class:`SynapseProcess`: one ``synapse.app.homeserver`` or
  ``synapse.app.generic_worker`` process, started with the Python of the
  Synapse release under test (:func:`synapse_python`: the tests' own, so the
  interop env's Synapse, unless ``SYNREPL_SYNAPSE_PYTHON`` names another
  environment's), its own log file, and a readiness check on ``GET /health``
  rather than sleeps.
- :func:`main_only` and :func:`cluster`: the two deployments the suite runs,
  written as Synapse's own YAML files so that synrepl reads them exactly as
  an operator's would be read (:func:`synrepl.config.load_config`).
- :class:`PostgresDatabase`: a fresh UTF8 / C-collation database per run.

Synapse is AGPL: it is started as a separate program here, never imported.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml
from synapse_envs import installed_release

from synrepl.releases import ReleaseFacts, SynapseRelease, facts_for

#: The Synapse release the interop extra installs (setup.cfg); other
#: releases run from environments of their own (``SYNREPL_SYNAPSE_PYTHON``).
SYNAPSE_VERSION = "1.163.2"

SECRET = "interop-replication-secret"

#: Every live process, so that a failing test can show their logs and an
#: interrupted run still kills them.
LIVE: dict[str, SynapseProcess] = {}

_START_TIMEOUT = float(os.environ.get("SYNREPL_INTEROP_START_TIMEOUT", "180"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subscribers(redis_port: int, channel: str) -> int:
    """How many connections are subscribed to ``channel`` (PUBSUB NUMSUB)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5)
    try:
        ((_, count),) = client.pubsub_numsub(channel)
        return int(count)
    except redis.RedisError:
        return 0
    finally:
        client.close()


def wait_for_subscribers(redis_port: int, channel: str, count: int, timeout: float = 60) -> None:
    """Block until at least ``count`` connections are subscribed to ``channel``.

    Synapse answers ``/health`` before its Redis subscription is up, and a
    process that subscribes after someone's REPLICATE does not answer it: so
    a client may only expect every writer's POSITION once all have subscribed.
    """
    deadline = time.monotonic() + timeout
    while (now := subscribers(redis_port, channel)) < count:
        if time.monotonic() > deadline:
            raise SynapseError(f"only {now} of {count} subscribers on {channel} after {timeout}s")
        time.sleep(0.05)


def synapse_python() -> str:
    """The interpreter whose environment holds the Synapse release under test.

    ``SYNREPL_SYNAPSE_PYTHON`` names it (``tests/interop/synapse_envs.py``
    builds one per release); otherwise it is the tests' own.  synrepl itself
    always runs from the tests' environment: only Synapse changes.
    """
    return os.environ.get("SYNREPL_SYNAPSE_PYTHON") or sys.executable


@functools.cache
def release_facts() -> ReleaseFacts:
    """What the release under test has on the wire (synrepl.releases, whose
    facts are checked against every release's own wheel): the scenarios
    expect only the streams, commands and endpoints it has."""
    return facts_for(SynapseRelease.parse(installed_synapse_version()))


@functools.cache
def synapse_streams() -> tuple[str, ...]:
    """The streams the release under test registers, in its order, read
    from its own ``STREAMS_MAP`` in its own interpreter (never imported here)."""
    answer = subprocess.run(
        [
            synapse_python(),
            "-c",
            "from synapse.replication.tcp.streams import STREAMS_MAP; print(' '.join(STREAMS_MAP))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return tuple(answer.stdout.split())


def installed_synapse_version(python: str | None = None) -> str:
    """The matrix-synapse release installed for ``python`` (default: :func:`synapse_python`)."""
    python = python or synapse_python()
    version = installed_release(python)
    if version is None:
        raise SynapseError(f"{python} has no matrix-synapse installed")
    return version


# --------------------------------------------------------------- processes


class SynapseError(RuntimeError):
    """A Synapse process did not start, or died."""


class SynapseProcess:
    """One Synapse process: start, wait for ``/health``, stop or kill, read its log."""

    def __init__(
        self,
        name: str,
        app: str,
        config_files: list[Path],
        health_port: int,
        directory: Path,
        python: str | None = None,
    ) -> None:
        self.name = name
        #: the interpreter (so the Synapse release) this process runs with
        self.python = python or synapse_python()
        self.app = app
        self.config_files = config_files
        self.health_port = health_port
        self.directory = directory
        self.log_file = directory / f"{name}.log"
        self.stdout_file = directory / f"{name}.stdout"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: list[float] = []

    def __repr__(self) -> str:
        return f"<SynapseProcess {self.name} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        """Start the process without waiting for it."""
        if self.running():
            raise SynapseError(f"{self.name} is already running")
        args = [self.python, "-m", self.app]
        for path in self.config_files:
            args += ["-c", str(path)]
        out = open(self.stdout_file, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.process = subprocess.Popen(
                args,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SYNAPSE_ASYNC_IO_REACTOR": "0"},
            )
        finally:
            out.close()
        self._spawned_at = time.monotonic()
        LIVE[self.name] = self

    def wait_ready(self, timeout: float = _START_TIMEOUT) -> float:
        """Block until ``GET /health`` answers 200; return the seconds since spawn."""
        url = f"http://127.0.0.1:{self.health_port}/health"
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise SynapseError(
                    f"Synapse {self.name} exited with {code} while starting:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        took = time.monotonic() - self._spawned_at
                        self.startup_seconds.append(took)
                        return took
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise SynapseError(
                    f"Synapse {self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def start(self, timeout: float = _START_TIMEOUT) -> float:
        self.spawn()
        return self.wait_ready(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        LIVE.pop(self.name, None)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        LIVE.pop(self.name, None)

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for path in (self.log_file, self.stdout_file):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            if tail.strip():
                parts.append(f"--- {path.name} (last {lines} lines) ---\n{tail}")
        return "\n".join(parts) or "(no log output)"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""


def _kill_leftovers() -> None:
    for proc in list(LIVE.values()):
        try:
            proc.kill()
        except Exception:  # noqa: BLE001, S110 - best effort at interpreter exit
            pass


atexit.register(_kill_leftovers)


# --------------------------------------------------------------- PostgreSQL


@attrs.define
class PostgresDatabase:
    """A fresh database on the machine's PostgreSQL, dropped at :meth:`drop`."""

    host: str = attrs.field(factory=lambda: os.environ.get("SYNREPL_INTEROP_PGHOST", "127.0.0.1"))
    port: int = attrs.field(factory=lambda: int(os.environ.get("SYNREPL_INTEROP_PGPORT", "5432")))
    user: str = attrs.field(factory=lambda: os.environ.get("SYNREPL_INTEROP_PGUSER", "postgres"))
    password: str | None = attrs.field(factory=lambda: os.environ.get("SYNREPL_INTEROP_PGPASSWORD"))
    name: str = attrs.field(factory=lambda: f"synapse_interop_{secrets.token_hex(6)}")

    def _connect(self, dbname: str) -> Any:
        import psycopg2

        conn = psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=dbname
        )
        conn.autocommit = True
        return conn

    def create(self) -> None:
        try:
            conn = self._connect("postgres")
        except Exception as e:
            raise SynapseError(
                f"the cluster scenarios need PostgreSQL at {self.user}@{self.host}:{self.port} "
                f"(SYNREPL_INTEROP_PG* to change): {e}"
            ) from e
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE {self.name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
                "TEMPLATE template0"
            )
        conn.close()

    def drop(self) -> None:
        conn = self._connect("postgres")
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        conn.close()

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self._connect(self.name)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        finally:
            conn.close()

    def synapse_config(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "user": self.user,
            "host": self.host,
            "port": self.port,
            "database": self.name,
            "cp_min": 1,
            "cp_max": 5,
        }
        if self.password:
            args["password"] = self.password
        return {"name": "psycopg2", "args": args}


# --------------------------------------------------------------- configuration

# High enough that no test ever meets a rate limit.
_UNLIMITED = {"per_second": 10_000, "burst_count": 100_000}
RATE_LIMITS: dict[str, Any] = {
    "rc_message": _UNLIMITED,
    "rc_registration": _UNLIMITED,
    "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
    "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
    "rc_joins_per_room": _UNLIMITED,
    "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
    "rc_presence": {"per_user": _UNLIMITED},
    "rc_room_creation": _UNLIMITED,
    "rc_key_requests": _UNLIMITED,
    "rc_profile": _UNLIMITED,
    "rc_delayed_event_mgmt": _UNLIMITED,
    "rc_3pid_validation": _UNLIMITED,
}

#: Presence timers short enough for a test to watch a user time out.
SYNC_ONLINE_TIMEOUT_MS = 2_000


def _log_config(path: Path, log_file: Path) -> None:
    config = {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                "%(request)s - %(message)s"
            }
        },
        "filters": {"context": {"()": "synapse.logging.context.LoggingContextFilter"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(log_file),
                "filters": ["context"],
                "encoding": "utf8",
            }
        },
        "loggers": {
            "synapse.storage.SQL": {"level": "WARNING"},
            "synapse.access.http": {"level": "INFO"},
            "twisted": {"level": "WARNING"},
        },
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }
    path.write_text(yaml.safe_dump(config))


def _signing_key(path: Path) -> None:
    from signedjson.key import generate_signing_key, write_signing_keys

    with open(path, "w") as f:
        write_signing_keys(f, [generate_signing_key("a_interop")])


def _listener(port: int, names: Iterable[str]) -> dict[str, Any]:
    return {
        "port": port,
        "bind_addresses": ["127.0.0.1"],
        "type": "http",
        "tls": False,
        "x_forwarded": False,
        "resources": [{"names": list(names), "compress": False}],
    }


def _common(directory: Path, server_name: str, redis_port: int) -> dict[str, Any]:
    _signing_key(directory / "signing.key")
    (directory / "media").mkdir(exist_ok=True)
    return {
        "server_name": server_name,
        "report_stats": False,
        "signing_key_path": str(directory / "signing.key"),
        "media_store_path": str(directory / "media"),
        "macaroon_secret_key": secrets.token_hex(16),
        "form_secret": secrets.token_hex(16),
        "registration_shared_secret": secrets.token_hex(16),
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        # Federate with nobody: the suite must not touch the network.
        "federation_domain_whitelist": [],
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "enable_metrics": False,
        "url_preview_enabled": False,
        "presence": {"enabled": True, "sync_online_timeout": SYNC_ONLINE_TIMEOUT_MS},
        # Profile changes then also go out on the profile_updates stream.
        "include_profile_updates_in_sync": True,
        "worker_replication_secret": SECRET,
        "redis": {"enabled": True, "host": "127.0.0.1", "port": redis_port},
        **RATE_LIMITS,
    }


def _write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path


@attrs.define
class Deployment:
    """A set of Synapse processes sharing one configuration and one Redis."""

    server_name: str
    directory: Path
    redis_port: int
    shared_config: Path
    #: instance name -> its process (``master`` is the main process)
    processes: dict[str, SynapseProcess]
    #: instance name -> the config files synrepl should load as that worker
    #: would (the shared file, plus the worker file for workers)
    config_files: dict[str, list[Path]]
    #: instance name -> its client-API base URL (instances with a client listener)
    client_urls: dict[str, str]
    database: PostgresDatabase | None = None

    @property
    def main(self) -> SynapseProcess:
        return self.processes["master"]

    def start(self) -> dict[str, float]:
        """Start the main process, then every worker in parallel; return start-up seconds."""
        took = {"master": self.main.start()}
        workers = [p for name, p in self.processes.items() if name != "master"]
        for proc in workers:
            proc.spawn()
        for proc in workers:
            took[proc.name] = proc.wait_ready()
        wait_for_subscribers(self.redis_port, self.server_name, len(self.processes))
        took["all subscribed to Redis"] = time.monotonic() - self.main._spawned_at
        return took

    def stop(self) -> None:
        # Workers first, so none logs the main process going away at length.
        for proc in reversed(list(self.processes.values())):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                proc.kill()


def main_only(
    directory: Path, redis_port: int, server_name: str = "main.interop.test"
) -> Deployment:
    """A single main process on SQLite: client and replication listeners,
    Redis, ``instance_map.main``, registration open.

    ``federation_sender_instances: []`` takes federation sending off the main
    process, which then publishes the ``federation`` stream too, so every
    stream of the Synapse release has a writer here.
    """
    client_port, repl_port = free_port(), free_port()
    _log_config(directory / "master.log.yaml", directory / "master.log")
    config = {
        **_common(directory, server_name, redis_port),
        "pid_file": str(directory / "master.pid"),
        "public_baseurl": f"http://127.0.0.1:{client_port}/",
        "listeners": [_listener(client_port, ["client"]), _listener(repl_port, ["replication"])],
        "database": {"name": "sqlite3", "args": {"database": str(directory / "homeserver.db")}},
        "log_config": str(directory / "master.log.yaml"),
        "instance_map": {"main": {"host": "127.0.0.1", "port": repl_port}},
        "federation_sender_instances": [],
    }
    shared = _write_yaml(directory / "homeserver.yaml", config)
    main = SynapseProcess("master", "synapse.app.homeserver", [shared], client_port, directory)
    return Deployment(
        server_name=server_name,
        directory=directory,
        redis_port=redis_port,
        shared_config=shared,
        processes={"master": main},
        config_files={"master": [shared]},
        client_urls={"master": f"http://127.0.0.1:{client_port}"},
    )


#: The cluster's workers: name -> the listener resources it serves.
CLUSTER_WORKERS: dict[str, tuple[str, ...]] = {
    "persister1": ("replication",),
    "persister2": ("replication",),
    "typing1": ("client", "replication"),
    "writer1": ("client", "replication"),
}

#: The instances of the rolling-upgrade cluster that start on the previous release.
MIXED_PREVIOUS = ("persister2", "writer1")

CLUSTER_STREAM_WRITERS: dict[str, list[str]] = {
    "events": ["persister1", "persister2"],
    "typing": ["typing1"],
    "to_device": ["writer1"],
    "account_data": ["writer1"],
    "receipts": ["writer1"],
    "presence": ["writer1"],
}


def cluster(
    directory: Path,
    redis_port: int,
    database: PostgresDatabase,
    server_name: str = "cluster.interop.test",
    pythons: Mapping[str, str] | None = None,
) -> Deployment:
    """A main process and four generic workers on PostgreSQL: two event
    persisters, a typing writer and a to_device/account_data/receipts/presence
    writer, all in ``instance_map``.

    ``pythons`` runs some instances (by name) with another interpreter, so
    another Synapse release, as during a rolling upgrade; the others run
    :func:`synapse_python`'s."""
    pythons = pythons or {}
    client_port, repl_port = free_port(), free_port()
    ports = {name: free_port() for name in CLUSTER_WORKERS}
    instance_map: dict[str, Any] = {"main": {"host": "127.0.0.1", "port": repl_port}}
    for name, port in ports.items():
        instance_map[name] = {"host": "127.0.0.1", "port": port}
    _log_config(directory / "master.log.yaml", directory / "master.log")
    config = {
        **_common(directory, server_name, redis_port),
        "pid_file": str(directory / "master.pid"),
        "public_baseurl": f"http://127.0.0.1:{client_port}/",
        "listeners": [_listener(client_port, ["client"]), _listener(repl_port, ["replication"])],
        "database": database.synapse_config(),
        "log_config": str(directory / "master.log.yaml"),
        "instance_map": instance_map,
        "stream_writers": CLUSTER_STREAM_WRITERS,
    }
    shared = _write_yaml(directory / "homeserver.yaml", config)
    processes = {
        "master": SynapseProcess(
            "master",
            "synapse.app.homeserver",
            [shared],
            client_port,
            directory,
            python=pythons.get("master"),
        )
    }
    config_files = {"master": [shared]}
    client_urls = {"master": f"http://127.0.0.1:{client_port}"}
    for name, resources in CLUSTER_WORKERS.items():
        _log_config(directory / f"{name}.log.yaml", directory / f"{name}.log")
        worker = _write_yaml(
            directory / f"{name}.yaml",
            {
                "worker_app": "synapse.app.generic_worker",
                "worker_name": name,
                "worker_listeners": [_listener(ports[name], resources)],
                "worker_log_config": str(directory / f"{name}.log.yaml"),
                "worker_pid_file": str(directory / f"{name}.pid"),
            },
        )
        processes[name] = SynapseProcess(
            name,
            "synapse.app.generic_worker",
            [shared, worker],
            ports[name],
            directory,
            python=pythons.get(name),
        )
        config_files[name] = [shared, worker]
        if "client" in resources:
            client_urls[name] = f"http://127.0.0.1:{ports[name]}"
    return Deployment(
        server_name=server_name,
        directory=directory,
        redis_port=redis_port,
        shared_config=shared,
        processes=processes,
        config_files=config_files,
        client_urls=client_urls,
        database=database,
    )
