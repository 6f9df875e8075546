"""Does a process speak replication as Synapse's workers do?  The sans-IO
rules behind a conformance check.

A :class:`Conformance` is told what a process under test did on Redis (its
subscriptions, what it published, its lost connections) and what the
scripted homeserver sent it (rows, garbage), each with the time; it judges
every rule as the events come and keeps, per rule, the first line that
broke it.  Whoever watches the process feeds it: ``synrepl conformance``
hands it every MONITOR entry of a Redis the process has to itself
(:meth:`Conformance.monitored`), a test may call the finer methods from a
tap.  Nothing here does I/O.

Connections are told apart by a client key (MONITOR's client address):
the process is subscribed while any of its connections is, so a lost
publishing connection does not call for a new REPLICATE, a lost
subscription does.

The rules (:data:`RULES`):

- ``replicate-after-subscribe``: a REPLICATE only while the process is
  subscribed to the channel (else its writers' answers would be lost);
- ``replicate-on-subscribe``: after every subscription, first and each
  reconnect, a REPLICATE within ``replicate_within`` seconds;
- ``resubscribes``: a process that lost its subscription (the watcher
  killed it, or Redis dropped it) subscribes again within
  ``replicate_within`` seconds;
- ``well-formed``: every line parses, as Synapse's parser would read it;
- ``worker-commands``: only commands a worker may send (no RDATA or
  POSITION from a process that writes no stream, no SERVER/NAME of the TCP
  era), and USER_IP only on ``<server_name>/USER_IP``;
- ``user-sync-pairing``: a USER_SYNC ``end`` only after a ``start`` of the
  same user and device, from one instance ID throughout;
- ``federation-ack-not-ahead``: a FEDERATION_ACK never names a token past the
  newest ``federation`` row the homeserver sent;
- ``survives-garbage``: no connection lost within ``garbage_grace`` seconds
  of garbage the homeserver published.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection

import attrs

from synrepl.commands import (
    ClearUserSyncCommand,
    Command,
    FederationAckCommand,
    NameCommand,
    PositionCommand,
    RdataCommand,
    ReplicateCommand,
    ServerCommand,
    UserIpCommand,
    UserSyncCommand,
    parse_line,
)
from synrepl.errors import ProtocolError
from synrepl.monitor import MonitorEntry

__all__ = ("Conformance", "Breach", "RULES")

RULES: tuple[str, ...] = (
    "replicate-after-subscribe",
    "replicate-on-subscribe",
    "resubscribes",
    "well-formed",
    "worker-commands",
    "user-sync-pairing",
    "federation-ack-not-ahead",
    "survives-garbage",
)


@attrs.frozen
class Breach:
    """The first time a rule was broken: when, why, and the line."""

    rule: str
    at: float
    why: str
    line: str | None = None


class Conformance:
    """The rules, judged as events come (see the module docs).

    Args:
        server_name: the channel.
        writes: streams the process under test writes (it may send their
            RDATA and POSITION).
        replicate_within: seconds after a subscription by which REPLICATE
            must have been published.
        garbage_grace: seconds after garbage in which no connection may drop.
        watched_from_start: whether the watch began before the process's
            first connection; if not, a USER_SYNC ``end`` whose ``start``
            came before the watch is not held against it.
    """

    def __init__(
        self,
        server_name: str,
        *,
        writes: Collection[str] = (),
        replicate_within: float = 5.0,
        garbage_grace: float = 5.0,
        watched_from_start: bool = True,
    ) -> None:
        self.server_name = server_name
        self._writes = frozenset(writes)
        self._replicate_within = replicate_within
        self._garbage_grace = garbage_grace
        self.breaches: dict[str, Breach] = {}
        #: How many times each rule was put to the test.
        self.exercised: dict[str, int] = dict.fromkeys(RULES, 0)
        self._watched_from_start = watched_from_start
        self._subscriptions: set[str] = set()
        self._replicate_due: float | None = None
        self._resubscribe_due: float | None = None
        self._syncing: set[tuple[str, str]] = set()
        self._instance: str | None = None
        self._federation_sent: int | None = None
        self._garbage_at: float | None = None

    # --- what the process did ---------------------------------------------------------

    @property
    def writes(self) -> frozenset[str]:
        """The streams the process may send RDATA and POSITION for."""
        return self._writes

    @property
    def subscribed_now(self) -> bool:
        """Whether the process is subscribed to the channel at this point."""
        return bool(self._subscriptions)

    def subscribed(self, at: float, client: str = "") -> None:
        """The process's connection ``client`` subscribed to the channel (again)."""
        self._tick(at)
        self._subscriptions.add(client)
        self._resubscribe_due = None
        self._replicate_due = at + self._replicate_within
        self.exercised["replicate-on-subscribe"] += 1

    def already_subscribed(self, client: str = "") -> None:
        """``client`` was subscribed before the watch began (no REPLICATE is
        due: the subscription was not seen)."""
        self._subscriptions.add(client)

    def connection_lost(self, at: float, client: str = "", *, forced: bool = False) -> None:
        """The process's connection ``client`` ended; ``forced``: the watcher
        ended it (a reconnect test), so no rule holds it against the process."""
        self._tick(at)
        if client in self._subscriptions:
            self._subscriptions.discard(client)
            if not self._subscriptions:
                self._resubscribe_due = at + self._replicate_within
                self.exercised["resubscribes"] += 1
        if forced:
            return
        if self._garbage_at is not None and at - self._garbage_at <= self._garbage_grace:
            self._breach("survives-garbage", at, "a connection dropped after garbage")

    def monitored(self, entry: MonitorEntry) -> None:
        """A command the process under test ran (a MONITOR entry of its Redis)."""
        name = entry.command
        if name in ("subscribe", "psubscribe"):
            patterns = [a.decode("utf-8", "replace") for a in entry.args[1:]]
            match = fnmatch.fnmatchcase if name == "psubscribe" else str.__eq__
            if any(match(self.server_name, p) for p in patterns):
                self.subscribed(entry.at, entry.client)
        elif name == "publish" and len(entry.args) == 3:
            channel = entry.args[1].decode("utf-8", "replace")
            if channel != self.server_name and not channel.startswith(f"{self.server_name}/"):
                return
            try:
                line = entry.args[2].decode("utf-8")
            except UnicodeDecodeError as e:
                self._tick(entry.at)
                self.exercised["well-formed"] += 1
                self._breach(
                    "well-formed",
                    entry.at,
                    f"not UTF-8 ({e.reason} at byte {e.start})",
                    entry.args[2].decode("utf-8", "replace"),
                )
                return
            self.published(entry.at, channel, line)

    def published(self, at: float, channel: str, line: str) -> None:
        """The process published ``line`` on ``channel``."""
        self._tick(at)
        self.exercised["well-formed"] += 1
        try:
            cmd = parse_line(line)
        except ProtocolError as e:
            self._breach("well-formed", at, str(e), line)
            return
        self._judge(at, channel, line, cmd)

    # --- what the homeserver sent ------------------------------------------------------

    def homeserver_sent(self, at: float, line: str) -> None:
        """The scripted homeserver published ``line`` (rows it owes acks for)."""
        self._tick(at)
        try:
            cmd = parse_line(line)
        except ProtocolError:
            self._garbage_at = at
            self.exercised["survives-garbage"] += 1
            return
        if (
            isinstance(cmd, RdataCommand)
            and cmd.stream_name == "federation"
            and cmd.token is not None
        ):
            self._federation_sent = max(self._federation_sent or 0, cmd.token)

    def finish(self, at: float) -> dict[str, Breach]:
        """The watch is over: deadlines that passed are judged; the breaches."""
        self._tick(at)
        return dict(self.breaches)

    # --- internals ------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        lost = self._resubscribe_due
        if lost is not None and now > lost:
            self._resubscribe_due = None
            self._breach(
                "resubscribes",
                lost,
                f"not subscribed again within {self._replicate_within:g} s of losing "
                "its subscription",
            )
        due = self._replicate_due
        if due is not None and now > due:
            self._replicate_due = None
            self._breach(
                "replicate-on-subscribe",
                due,
                f"no REPLICATE within {self._replicate_within:g} s of subscribing",
            )

    def _judge(self, at: float, channel: str, line: str, cmd: Command) -> None:
        if isinstance(cmd, ReplicateCommand):
            self.exercised["replicate-after-subscribe"] += 1
            if not self._subscriptions:
                self._breach(
                    "replicate-after-subscribe", at, "REPLICATE before the subscription", line
                )
            self._replicate_due = None
        self.exercised["worker-commands"] += 1
        if isinstance(cmd, (ServerCommand, NameCommand)):
            self._breach("worker-commands", at, f"{cmd.NAME} is the TCP era's", line)
        elif (
            isinstance(cmd, (RdataCommand, PositionCommand)) and cmd.stream_name not in self._writes
        ):
            self._breach(
                "worker-commands",
                at,
                f"{cmd.NAME} for {cmd.stream_name}, a stream it does not write",
                line,
            )
        user_ip_channel = f"{self.server_name}/USER_IP"
        if isinstance(cmd, UserIpCommand) != (channel == user_ip_channel):
            self._breach(
                "worker-commands",
                at,
                f"{cmd.NAME} on {channel!r} (USER_IP goes on {user_ip_channel!r} alone)",
                line,
            )
        if isinstance(cmd, (UserSyncCommand, ClearUserSyncCommand)):
            self._user_sync(at, line, cmd)
        if isinstance(cmd, FederationAckCommand):
            self.exercised["federation-ack-not-ahead"] += 1
            sent = self._federation_sent
            if sent is None or cmd.token > sent:
                self._breach(
                    "federation-ack-not-ahead",
                    at,
                    f"acked {cmd.token}, newest federation row sent: {sent}",
                    line,
                )

    def _user_sync(self, at: float, line: str, cmd: UserSyncCommand | ClearUserSyncCommand) -> None:
        self.exercised["user-sync-pairing"] += 1
        if self._instance is None:
            self._instance = cmd.instance_id
        elif cmd.instance_id != self._instance:
            self._breach(
                "user-sync-pairing",
                at,
                f"instance {cmd.instance_id!r} after {self._instance!r}",
                line,
            )
        if isinstance(cmd, ClearUserSyncCommand):
            self._syncing.clear()
            return
        key = (cmd.user_id, str(cmd.device_id))
        if cmd.is_syncing:
            self._syncing.add(key)
        elif key not in self._syncing:
            if self._watched_from_start:
                self._breach("user-sync-pairing", at, "an end without its start", line)
        else:
            self._syncing.discard(key)

    def _breach(self, rule: str, at: float, why: str, line: str | None = None) -> None:
        self.breaches.setdefault(rule, Breach(rule, at, why, line))
