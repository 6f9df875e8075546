"""The Redis side of ``synrepl conformance``: watch, publish, disconnect.

A :class:`RedisProbe` holds two connections of its own to the Redis that the
process under test uses, and reads the other clients off it:

- one runs MONITOR, so every command of every client arrives in the order
  Redis ran it, with the server's timestamp;
- one publishes the scripted homeserver's lines and runs CLIENT LIST,
  CLIENT KILL and TIME (admin commands, which MONITOR does not show).

Every client that is not the probe's own is taken to be the process under
test; which is why the process needs a Redis to itself.  This is blocking
redis-py code: the command runs it on a thread of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import redis

from synrepl.config import RedisConfig
from synrepl.monitor import MonitorEntry, parse_monitor_line

__all__ = ("RedisProbe", "ClientInfo")


@attrs.frozen
class ClientInfo:
    """One connection of the process under test, from CLIENT LIST."""

    id: int
    addr: str
    subscriptions: int


class RedisProbe:
    """The probe's two connections (see the module docs).

    Raises:
        redis.RedisError: Redis cannot be reached (from the constructor).
    """

    def __init__(self, config: RedisConfig, *, timeout: float) -> None:
        kwargs = _connection_kwargs(config, timeout)
        cls: type[redis.Connection | redis.UnixDomainSocketConnection] = (
            redis.UnixDomainSocketConnection if config.path else redis.Connection
        )
        if config.use_tls and not config.path:
            cls = redis.SSLConnection
        pool = redis.ConnectionPool(connection_class=cls, **kwargs)
        # redis-py's connection classes are partly untyped.
        self._control: Any = redis.Redis(connection_pool=pool, single_connection_client=True)
        self._control.ping()
        monitor: Any = cls(**kwargs)
        monitor.connect()
        monitor.send_command("CLIENT", "ID")
        monitor_id = int(monitor.read_response())
        self._own_ids = {int(self._control.client_id()), monitor_id}
        monitor.send_command("MONITOR")
        monitor.read_response()
        self._monitor = monitor
        own = [c for c in self._client_list() if int(c["id"]) in self._own_ids]
        #: The probe's own client addresses, as MONITOR names them.
        self.own_addrs = frozenset(str(c["addr"]) for c in own)

    def now(self) -> float:
        """The Redis server's clock (MONITOR's timestamps are on it)."""
        seconds, micros = self._control.time()
        return float(seconds) + float(micros) / 1e6

    def clients(self) -> list[ClientInfo]:
        """The connections that are not the probe's own."""
        return [
            ClientInfo(int(c["id"]), str(c["addr"]), int(c.get("sub", 0)) + int(c.get("psub", 0)))
            for c in self._client_list()
            if int(c["id"]) not in self._own_ids
        ]

    def kill(self, clients: Iterable[ClientInfo]) -> None:
        """End these connections (CLIENT KILL ID); one already gone is no error."""
        for client in clients:
            self._control.execute_command("CLIENT", "KILL", "ID", str(client.id))

    def publish(self, channel: str, line: str) -> None:
        """PUBLISH ``line`` on ``channel`` from the probe's own connection."""
        self._control.publish(channel, line.encode("utf-8", "surrogateescape"))

    def read(self, timeout: float) -> list[MonitorEntry]:
        """The MONITOR entries that arrive within ``timeout`` seconds (none: [])."""
        entries: list[MonitorEntry] = []
        if not self._monitor.can_read(timeout=timeout):
            return entries
        while True:
            raw = self._monitor.read_response(disable_decoding=True)
            if isinstance(raw, bytes) and raw != b"OK":
                entries.append(parse_monitor_line(raw))
            if not self._monitor.can_read(timeout=0):
                return entries

    def close(self) -> None:
        """Close both connections."""
        self._monitor.disconnect()
        self._control.close()

    def _client_list(self) -> list[dict[str, str]]:
        return list(self._control.client_list())


def _connection_kwargs(config: RedisConfig, timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    if config.path:
        kwargs["path"] = config.path
    else:
        kwargs.update(host=config.host, port=config.port)
    if config.dbid is not None:
        kwargs["db"] = config.dbid
    if config.username:
        kwargs["username"] = config.username
    if config.password is not None:
        kwargs["password"] = config.password.reveal()
    if config.use_tls and not config.path:
        kwargs.update(
            ssl_certfile=config.certificate_file,
            ssl_keyfile=config.private_key_file,
            ssl_ca_certs=config.ca_file,
            ssl_ca_path=config.ca_path,
        )
    return kwargs
