"""The Redis connection policy, without a reactor.

Rule 1: every decision about the Redis connection pair lives here: the
options and their limits, what to send on a fresh connection, how long to
wait before the next attempt, what a received message becomes, what is
counted and what is logged.  The adapters (:mod:`synrepl.twisted.redis_transport`,
and one day an asyncio one) open sockets, run timers and carry these
decisions out; they decide nothing themselves.

Theory of operation
===================

A Synapse process talks to its cluster through one Redis over two
connections, each a *link* with its own reconnect loop:

    connect (TCP, TLS or unix socket)
      -> set up: send :func:`setup_sequence` in order, all answered within
         ``connect_timeout``
      -> ready: a PING every ``keepalive_interval``; no answer within
         ``keepalive_timeout`` ends the connection
      -> lost -> wait :meth:`ReconnectBackoff.delay` -> connect

The *subscriber* sends ``SUBSCRIBE``; the *publisher* does not (a subscribed
connection cannot publish).  Any failure ends only the attempt, never the
loop: a refused AUTH or SELECT is retried like a refused connection, unlike
txredisapi, which stops for good then (Synapse issue #9351).

:class:`LinkState` is one link's memory: it is told what happened (set up,
ended, stopped) with the time, and answers with what to log, whether it was
a loss or a failed attempt, and how long to wait.  It logs a change of
state once: "lost" or "cannot connect", then "still cannot connect" at most
every ``down_log_interval``, then "reconnected"; every attempt in between
only at DEBUG level.

A received pub/sub message becomes a line with :func:`message_line`, or the
reason it is skipped (not UTF-8, blank).  Failure descriptions pass through
:func:`describe_failure`, which removes the password and bounds the length.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from typing import Final, Literal

import attrs

from synrepl.config import RedisConfig
from synrepl.errors import SynreplError

__all__ = (
    "TransportOptions",
    "ReconnectBackoff",
    "Role",
    "SUBSCRIBER",
    "PUBLISHER",
    "SetupCommand",
    "setup_sequence",
    "subscription_channels",
    "UndecodableMessage",
    "BlankMessage",
    "BLANK",
    "message_line",
    "channel_name",
    "RedisTransportStats",
    "AttemptFailure",
    "LogLine",
    "SetUp",
    "Ended",
    "LinkState",
    "describe_failure",
    "redact",
    "REASON_LIMIT",
    "redis_address",
    "RedisTransportError",
    "NotConnectedError",
    "PublishDisabledError",
)

#: Which connection of the pair.
Role = Literal["subscriber", "publisher"]
SUBSCRIBER: Final = "subscriber"
PUBLISHER: Final = "publisher"

#: Longest failure description put in a log line or an :class:`AttemptFailure`.
REASON_LIMIT: Final = 300


# --- errors --------------------------------------------------------------------


class RedisTransportError(SynreplError):
    """Base of the errors a Redis transport raises."""


class NotConnectedError(RedisTransportError, ConnectionError):
    """The publishing connection is not ready (connecting, reconnecting or stopped),
    or it was lost before Redis answered."""


class PublishDisabledError(RedisTransportError, RuntimeError):
    """``publish()`` was called on a transport built with ``publish_enabled=False``."""


# --- options ---------------------------------------------------------------------


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{attribute.name} must be more than 0, got {value!r}")


def _not_below_min(instance: TransportOptions, attribute: object, value: float) -> None:
    if not value >= instance.min_backoff:
        raise ValueError(
            f"max_backoff ({value!r}) must not be below min_backoff ({instance.min_backoff!r})"
        )


def _client_name(instance: object, attribute: object, value: str | None) -> None:
    # CLIENT SETNAME refuses spaces; an empty name would clear it.
    if value is not None and (not value or re.search(r"\s", value)):
        raise ValueError(f"client_name must be non-empty without spaces, got {value!r}")


@attrs.frozen
class TransportOptions:
    """How a Redis transport keeps its connections; every time is in seconds.

    Attributes:
        keepalive_interval: between PINGs on each ready connection.
        keepalive_timeout: how long a PING may go unanswered before the
            connection is aborted and re-made (this is what notices a Redis
            that hangs, or a network that drops packets silently).
        connect_timeout: for the TCP/TLS connect, again for the set-up
            commands, and for ``stop()`` to wait for a clean close before it
            aborts the connection.
        min_backoff: the first wait between attempts.
        max_backoff: the largest one; each wait is randomly shortened by up
            to half, so that many processes do not reconnect in step.
        client_name: if set, each connection is named ``<client_name>-sub``
            or ``-pub`` (CLIENT SETNAME), so operators find it in CLIENT LIST.
        tls_verify: check the server certificate against ``ca_file`` /
            ``ca_path`` (or the system's CAs) and the host name.  Synapse
            does not verify at all; pass False only to match that on a
            trusted network.
        down_log_interval: while a connection stays down, how often to log
            that it still is.

    Raises:
        ValueError: a value is out of range; the message names the field.
    """

    keepalive_interval: float = attrs.field(default=30.0, validator=_positive)
    keepalive_timeout: float = attrs.field(default=10.0, validator=_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    min_backoff: float = attrs.field(default=0.1, validator=_positive)
    max_backoff: float = attrs.field(default=5.0, validator=_not_below_min)
    client_name: str | None = attrs.field(default=None, validator=_client_name)
    tls_verify: bool = True
    down_log_interval: float = attrs.field(default=60.0, validator=_positive)

    @property
    def backoff(self) -> ReconnectBackoff:
        """The reconnect waits these options ask for."""
        return ReconnectBackoff(self.min_backoff, self.max_backoff)


# --- backoff ---------------------------------------------------------------------


@attrs.frozen
class ReconnectBackoff:
    """Exponential waits between connection attempts, with jitter.

    The wait doubles from ``min_delay`` with each failed attempt up to
    ``max_delay``, and is then shortened by a random fraction of up to half:
    a cluster's processes that lost Redis together do not all come back in
    the same instant.

    Attributes:
        min_delay: the base wait after losing a connection that was set up.
        max_delay: the cap on the base wait.
        rng: returns a float in [0, 1); swap it for a fixed one in tests.
    """

    min_delay: float = attrs.field(validator=attrs.validators.gt(0))
    max_delay: float = attrs.field()
    rng: Callable[[], float] = attrs.field(default=random.random, eq=False, repr=False)

    @max_delay.validator
    def _check_max(self, attribute: object, value: float) -> None:
        if not value >= self.min_delay:
            raise ValueError(
                f"max_delay ({value!r}) must not be below min_delay ({self.min_delay!r})"
            )

    def base(self, failures: int) -> float:
        """The wait before jitter: ``min_delay * 2**failures``, at most ``max_delay``."""
        return min(self.max_delay, self.min_delay * 2.0 ** min(failures, 32))

    def delay(self, failures: int) -> float:
        """How long to wait before the next attempt.

        Args:
            failures: attempts failed since the link was last set up (0
                right after a ready connection was lost, 1 after the first
                failed attempt, ...).

        Returns:
            A wait between half of :meth:`base` and all of it.
        """
        return self.base(failures) * (1.0 - self.rng() / 2)


# --- the set-up sequence --------------------------------------------------------------


@attrs.frozen
class SetupCommand:
    """One command sent on a fresh connection, before it counts as set up.

    Attributes:
        args: the command as sent (may hold the password: not in the repr).
        label: how logs and errors name it (never the password).
        fatal: whether Redis refusing it fails the attempt (AUTH, SELECT) or
            only earns a warning (CLIENT SETNAME, which an ACL may forbid).
        answer: ``"reply"`` for one ordinary reply; ``"subscriptions"`` for
            SUBSCRIBE, which Redis answers with one confirmation push per
            channel instead.
    """

    args: tuple[str | int, ...] = attrs.field(repr=False)
    label: str
    fatal: bool = True
    answer: Literal["reply", "subscriptions"] = "reply"

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels a SUBSCRIBE names (empty for other commands)."""
        if self.answer != "subscriptions":
            return ()
        return tuple(str(a) for a in self.args[1:])

    def refusal(self, error: str) -> str:
        """What to say when Redis answers this command with ``error``."""
        if self.fatal:
            return f"{self.label} failed: {error}"
        return f"Redis refused {self.label}: {error}"


def subscription_channels(channels: Sequence[str]) -> tuple[str, ...]:
    """``channels`` without duplicates, checked.

    Raises:
        TypeError: one string was passed instead of a sequence of them.
        ValueError: no channel, or an empty or non-string one.
    """
    if isinstance(channels, str):
        raise TypeError("channels must be a sequence of channel names, not one string")
    unique = tuple(dict.fromkeys(channels))
    if not unique or not all(isinstance(c, str) and c for c in unique):
        raise ValueError(f"channels must be non-empty strings, got {list(channels)!r}")
    return unique


def setup_sequence(
    redis: RedisConfig,
    role: Role,
    channels: Sequence[str] = (),
    client_name: str | None = None,
) -> tuple[SetupCommand, ...]:
    """The commands a fresh connection sends, in order, before it is ready.

    ``AUTH [username] password`` when there is a password, ``SELECT dbid``
    when there is a ``dbid``, ``CLIENT SETNAME <client_name>-sub`` (or
    ``-pub``) when named, and for the subscriber ``SUBSCRIBE`` with every
    channel.  REPLICATE is not part of it: the replication client sends it
    once the transport reports the subscription.
    """
    steps: list[SetupCommand] = []
    password = redis.password.reveal() if redis.password is not None else ""
    if password:
        user: tuple[str, ...] = (redis.username,) if redis.username else ()
        steps.append(SetupCommand(("AUTH", *user, password), "AUTH"))
    if redis.dbid is not None:
        steps.append(SetupCommand(("SELECT", redis.dbid), f"SELECT {redis.dbid}"))
    if client_name is not None:
        name = f"{client_name}-{role[:3]}"
        steps.append(SetupCommand(("CLIENT", "SETNAME", name), "CLIENT SETNAME", fatal=False))
    if role == SUBSCRIBER:
        subscribed = subscription_channels(channels)
        steps.append(SetupCommand(("SUBSCRIBE", *subscribed), "SUBSCRIBE", answer="subscriptions"))
    return tuple(steps)


# --- received messages ---------------------------------------------------------------


@attrs.frozen
class UndecodableMessage:
    """A message that is not UTF-8: skipped.  Its content is not kept (a
    ``USER_IP`` line carries an access token).

    Attributes:
        reason: the decoder's complaint (``"invalid start byte"``, ...).
        position: the byte offset of the first bad byte.
        length: the message's length in bytes.
    """

    reason: str
    position: int
    length: int


@attrs.frozen
class BlankMessage:
    """An empty or whitespace-only message: ignored."""


#: The one :class:`BlankMessage`.
BLANK: Final = BlankMessage()


def message_line(data: object) -> str | UndecodableMessage | BlankMessage:
    """What a pub/sub message's payload becomes: its line, or why it is skipped.

    ``data`` is bytes as Redis sent them (a str is taken as already decoded).
    """
    if isinstance(data, str):
        line = data
    elif isinstance(data, (bytes, bytearray)):
        try:
            line = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            return UndecodableMessage(e.reason, e.start, len(e.object))
    else:
        line = str(data)
    if not line.strip():
        return BLANK
    return line


def channel_name(channel: object) -> str:
    """A message's channel as text (undecodable bytes replaced: it is only a name)."""
    if isinstance(channel, str):
        return channel
    if isinstance(channel, (bytes, bytearray)):
        return bytes(channel).decode("utf-8", "replace")
    return str(channel)


# --- counters -------------------------------------------------------------------------


@attrs.define
class RedisTransportStats:
    """Counters of one Redis transport; they only ever grow."""

    #: Subscriber connections fully set up (subscribed), the first one included.
    connects: int = 0
    #: Of those, the ones that followed a lost connection.
    reconnects: int = 0
    #: Subscriber connections lost after they were set up (stop() excluded).
    connection_losses: int = 0
    #: Publisher connections set up / lost after set-up (stop() excluded).
    publisher_connects: int = 0
    publisher_losses: int = 0
    #: Connection attempts of either link that failed before they were set up.
    failed_attempts: int = 0
    #: Connections aborted because a PING went unanswered.
    keepalive_timeouts: int = 0
    #: Every message received from Redis, good or bad.
    messages_received: int = 0
    #: Messages handed to ``on_line``.
    lines_delivered: int = 0
    #: Blank or whitespace-only messages, ignored.
    blank_messages: int = 0
    #: Messages that are not UTF-8, skipped.
    undecodable_messages: int = 0
    #: Exceptions raised by ``on_line``, ``on_subscribed`` or ``on_connection_lost``.
    handler_errors: int = 0
    #: PUBLISH commands answered by Redis / failed (not connected, refused, lost).
    published: int = 0
    publish_failures: int = 0


# --- failure descriptions ----------------------------------------------------------------


def redact(text: str, password: str | None, limit: int = REASON_LIMIT) -> str:
    """``text`` with the password replaced by ``***`` and cut to ``limit`` chars."""
    if password:
        text = text.replace(password, "***")
    if len(text) > limit:
        text = text[:limit] + "..."
    return text


def describe_failure(error: BaseException, password: str | None, *, redis_reply: bool) -> str:
    """A short, password-free account of why a connection or command failed.

    Args:
        error: what was raised.
        password: the Redis password, to be removed from the text.
        redis_reply: ``error`` carries Redis's own error reply; like a
            :class:`RedisTransportError` it is worded already, so its type
            is not named.  Anything else is ``"<type>: <message>"``.
    """
    text = str(error).strip() or type(error).__name__
    if not (redis_reply or isinstance(error, RedisTransportError)):
        text = f"{type(error).__name__}: {text}"
    return redact(text, password)


def redis_address(redis: RedisConfig) -> str:
    """Where Redis is, for log lines (never with credentials)."""
    if redis.path:
        return f"unix:{redis.path}"
    host = f"[{redis.host}]" if ":" in redis.host else redis.host
    return f"{host}:{redis.port}{' (TLS)' if redis.use_tls else ''}"


# --- one link's state ------------------------------------------------------------------


@attrs.frozen
class LogLine:
    """A log record to emit: ``logger.log(level, message, *args)``."""

    level: int
    message: str
    args: tuple[object, ...] = ()


@attrs.frozen
class AttemptFailure:
    """A connection attempt that failed before the connection was set up.

    Attributes:
        role: which link.
        reason: why, password-free and bounded (Redis's refusal, the
            socket error, a timeout), as in the log.
        failures: consecutive failed attempts of this link, this one included.
    """

    role: Role
    reason: str
    failures: int


@attrs.frozen
class SetUp:
    """A link's connection is set up.

    Attributes:
        log: what to log (None: nothing).
        reconnect: the link had been set up before.
    """

    log: LogLine | None
    reconnect: bool


@attrs.frozen
class Ended:
    """A link's connection or attempt ended; the adapter waits ``delay`` and
    tries again.

    Attributes:
        log: what to log.
        delay: seconds until the next attempt.
        failure: the failed attempt, or None when a set-up connection was
            lost (then the owner's ``on_connection_lost`` rules apply).
    """

    log: LogLine
    delay: float
    failure: AttemptFailure | None

    @property
    def lost(self) -> bool:
        """A connection that was set up ended (rather than an attempt failing)."""
        return self.failure is None


class LinkState:
    """One link's reconnect loop, less the I/O: counts, logs, waits.

    Tell it what happened, with the clock's time: :meth:`set_up`,
    :meth:`ended`, :meth:`stopped`.  It updates ``stats`` (shared by both
    links) and answers with what to log and how long to wait.

    Args:
        role: which link.
        address: where Redis is, for log lines (see :func:`redis_address`).
        options: the transport's options (``down_log_interval`` and the
            timeouts are read here).
        stats: the transport's counters.
        backoff: the waits (default: ``options.backoff``).
    """

    def __init__(
        self,
        role: Role,
        address: str,
        options: TransportOptions,
        stats: RedisTransportStats,
        backoff: ReconnectBackoff | None = None,
    ) -> None:
        self.role: Role = role
        self.address = address
        self.options = options
        self.stats = stats
        self.backoff = backoff if backoff is not None else options.backoff
        #: The current connection is set up (and not yet ended).
        self.ready = False
        #: Some connection of this link was set up once.
        self.ever_ready = False
        #: Consecutive failed attempts since the link was last set up.
        self.failures = 0
        self._down_since: float | None = None
        self._down_logged = False
        self._last_down_log = 0.0

    def set_up(self, now: float) -> SetUp:
        """The current connection answered its whole set-up sequence."""
        log: LogLine | None = None
        if not self.ever_ready:
            log = LogLine(
                logging.INFO,
                "Redis %s: connected to %s%s",
                (
                    self.role,
                    self.address,
                    f" after {self.failures} failed attempts" if self.failures else "",
                ),
            )
        elif self._down_since is not None:
            log = LogLine(
                logging.INFO,
                "Redis %s: reconnected to %s after %.1f s down (%d failed attempts)",
                (self.role, self.address, now - self._down_since, self.failures),
            )
        reconnect = self.ever_ready
        self.ready = self.ever_ready = True
        self.failures = 0
        self._down_since = None
        self._down_logged = False
        if self.role == SUBSCRIBER:
            self.stats.connects += 1
            if reconnect:
                self.stats.reconnects += 1
        else:
            self.stats.publisher_connects += 1
        return SetUp(log, reconnect)

    def ended(self, now: float, why: str) -> Ended:
        """The current connection ended, or the attempt failed, for ``why``
        (already described, see :func:`describe_failure`); not by ``stop()``."""
        if self.ready:
            self.ready = False
            if self.role == SUBSCRIBER:
                self.stats.connection_losses += 1
            else:
                self.stats.publisher_losses += 1
            self._down_since, self._down_logged, self._last_down_log = now, True, now
            log = LogLine(
                logging.WARNING,
                "Redis %s: connection to %s lost (%s); reconnecting",
                (self.role, self.address, why),
            )
            return Ended(log, self.backoff.delay(self.failures), None)
        self.failures += 1
        self.stats.failed_attempts += 1
        if self._down_since is None:
            self._down_since = now
        if not self._down_logged:
            self._down_logged, self._last_down_log = True, now
            log = LogLine(
                logging.WARNING,
                "Redis %s: cannot connect to %s (%s); retrying",
                (self.role, self.address, why),
            )
        elif now - self._last_down_log >= self.options.down_log_interval:
            self._last_down_log = now
            log = LogLine(
                logging.WARNING,
                "Redis %s: still cannot connect to %s after %d attempts over %.0f s "
                "(last error: %s)",
                (self.role, self.address, self.failures, now - self._down_since, why),
            )
        else:
            log = LogLine(
                logging.DEBUG,
                "Redis %s: attempt %d failed: %s",
                (self.role, self.failures, why),
            )
        failure = AttemptFailure(self.role, why, self.failures)
        return Ended(log, self.backoff.delay(self.failures), failure)

    def stopped(self) -> bool:
        """The connection was closed by ``stop()``: nothing is counted or
        logged.  Returns whether it had been set up."""
        was_ready, self.ready = self.ready, False
        return was_ready

    def setup_timed_out(self) -> str:
        """Why a connection whose set-up went unanswered is closed."""
        return f"no answer to AUTH/SELECT/SUBSCRIBE within {self.options.connect_timeout:g} s"

    def keepalive_timed_out(self) -> str:
        """Counts a PING gone unanswered; returns why the connection is aborted."""
        self.stats.keepalive_timeouts += 1
        return f"no answer to PING within {self.options.keepalive_timeout:g} s"
