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

:class:`Keepalive` is one ready connection's PING bookkeeping: when one is
due, when its timer runs, and what pausing the reading does to it.

:class:`TransportState` is the pair's memory: both links' states, the
counters, and the callback contract (``on_subscribed`` once both links are
ready, ``on_connection_lost`` once that subscriber connection ends, the two
strictly alternating; every message counted, decoded and handed up; every
callback exception logged and counted).  An adapter builds one, reports
what its sockets do, and leaves every decision to it.

A received pub/sub message becomes a line with :func:`message_line`, or the
reason it is skipped (not UTF-8, blank).  Failure descriptions pass through
:func:`describe_failure`, which removes the password and bounds the length.
:func:`tls_settings` reads and checks the TLS files of the ``redis``
section once, so a bad one fails at once, the same way on every adapter.
"""

from __future__ import annotations

import logging
import random
import re
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Literal, cast

import attrs

from synrepl._ratelimit import RateLimitedWarning, SecondsClock
from synrepl.config import RedisConfig
from synrepl.errors import ConfigError, EncodeError, SynreplError

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
    "log_line",
    "SetUp",
    "Ended",
    "LinkState",
    "Keepalive",
    "TransportState",
    "publish_payload",
    "TlsSettings",
    "tls_settings",
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

#: Rate-limited warnings (bad messages, callback errors): at most one per period.
_RATE_LIMIT_PERIOD: Final = 10.0
#: A refused CLIENT SETNAME is said once an hour at most.
_SETNAME_WARNING_PERIOD: Final = 3600.0

logger = logging.getLogger("synrepl.redis")


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

    def refused(self, error: str) -> str:
        """Redis answered this command with ``error``: the attempt fails if
        the command is fatal; otherwise returns the warning to give.

        Raises:
            RedisTransportError: the command is fatal (AUTH, SELECT); its
                message is :meth:`refusal`'s.
        """
        if self.fatal:
            raise RedisTransportError(self.refusal(error))
        return self.refusal(error)


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
    if isinstance(data, (bytes, bytearray)):  # first: what every message is
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return UndecodableMessage(e.reason, e.start, len(e.object))
    elif isinstance(data, str):
        line = data
    else:
        line = str(data)
    if not line or line.isspace():  # line.strip() without the copy
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


def log_line(line: LogLine | None) -> None:
    """Emit ``line`` (if any) on the ``synrepl.redis`` logger, as every link does."""
    if line is not None:
        logger.log(line.level, line.message, *line.args)


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

    def connect_timed_out(self) -> str:
        """Why an attempt whose connect (TCP, TLS handshake) took too long is given up."""
        return f"no connection within {self.options.connect_timeout:g} s"

    def setup_timed_out(self) -> str:
        """Why a connection whose set-up went unanswered is closed."""
        return f"no answer to AUTH/SELECT/SUBSCRIBE within {self.options.connect_timeout:g} s"

    def keepalive_timed_out(self) -> str:
        """Counts a PING gone unanswered; returns why the connection is aborted."""
        self.stats.keepalive_timeouts += 1
        return f"no answer to PING within {self.options.keepalive_timeout:g} s"


# --- keepalive -----------------------------------------------------------------------


class Keepalive:
    """One ready connection's PINGs, less the timers.

    A PING is due every ``keepalive_interval``, with at most one unanswered
    at a time; its answer must come within ``keepalive_timeout``, or the
    connection is aborted (:meth:`LinkState.keepalive_timed_out` says why).
    Any answer, even an error reply, shows that the connection is alive.
    While reading is paused no PING is sent and none is timed, since its
    answer could not be read; one left unanswered when reading paused is
    timed afresh, for a whole ``keepalive_timeout``, once reading resumes.

    The adapter asks :meth:`due` every ``interval`` and, when it answers
    True, sends PING and starts a timer of ``timeout``; :meth:`answered`,
    :meth:`pause` and :meth:`resume` say whether to cancel or start that
    timer.  Make a new one for each connection that is set up.

    Args:
        options: the transport's options.
        paused: reading is paused already.
    """

    def __init__(self, options: TransportOptions, *, paused: bool = False) -> None:
        #: Seconds between two checks of :meth:`due`.
        self.interval = options.keepalive_interval
        #: Seconds a PING may go unanswered while reading.
        self.timeout = options.keepalive_timeout
        #: A PING was sent and not answered yet.
        self.outstanding = False
        #: The timer of the outstanding PING is running.
        self.timing = False
        self.paused = paused

    def due(self) -> bool:
        """An interval has passed: True to send a PING now and start its timer."""
        if self.outstanding or self.paused:
            return False
        self.outstanding = self.timing = True
        return True

    def answered(self) -> bool:
        """The PING was answered; True to cancel its timer."""
        was_timing = self.timing
        self.outstanding = self.timing = False
        return was_timing

    def pause(self) -> bool:
        """Reading pauses; True to cancel the PING's timer."""
        self.paused = True
        was_timing, self.timing = self.timing, False
        return was_timing

    def resume(self) -> bool:
        """Reading resumes; True to start the outstanding PING's timer afresh."""
        self.paused = False
        if self.outstanding and not self.timing:
            self.timing = True
            return True
        return False


# --- publishing ------------------------------------------------------------------------


def publish_payload(message: str) -> bytes:
    """The bytes PUBLISH sends for ``message``.

    Raises:
        EncodeError: the message has a newline or cannot be UTF-8 encoded.
    """
    if "\n" in message:
        raise EncodeError("a replication message must not contain a newline")
    try:
        return message.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EncodeError(f"message cannot be encoded as UTF-8: {e.reason}") from None


# --- the pair ----------------------------------------------------------------------------


class TransportState:
    """A transport's two links and its callback contract, less the I/O.

    The adapter reports what its sockets do (a link set up or lost, an
    attempt failed, a message arrived, ``stop()`` called) and this object
    counts, logs and calls back:

    - ``on_subscribed`` once per subscriber connection, after every channel
      is confirmed and the publisher (unless publishing is disabled) is
      ready, never after ``stop()``;
    - ``on_connection_lost`` once when that subscriber connection ends,
      ``stop()`` included: the two strictly alternate, starting with
      ``on_subscribed``;
    - ``on_attempt_failed`` for each failed attempt of either link;
    - ``on_line`` for each non-blank UTF-8 message, even one that arrives
      before ``on_subscribed`` (the publisher still connecting); messages
      are counted but not handed up after ``stop()``.

    An exception from a callback is logged and counted
    (``stats.handler_errors``); it never reaches the adapter, so it cannot
    end a connection.  Warnings about bad messages and callback errors are
    rate-limited, and never quote a message (a ``USER_IP`` line carries an
    access token).

    Args:
        redis: where and how to connect.
        channels: the channels to SUBSCRIBE to (duplicates are dropped).
        on_line: called with ``(channel, line)`` for each line.
        on_subscribed: called once both links are ready.
        on_connection_lost: called once that subscriber connection ends.
        on_attempt_failed: called for each failed attempt (None: not called).
        publish_enabled: False has no publisher link.
        options: the transport's options.
        clock: tells the time for the rate-limited warnings.

    Raises:
        TypeError, ValueError: ``channels`` is one string, or empty.
    """

    def __init__(
        self,
        redis: RedisConfig,
        channels: Sequence[str],
        *,
        on_line: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        on_connection_lost: Callable[[], None],
        on_attempt_failed: Callable[[AttemptFailure], None] | None,
        publish_enabled: bool,
        options: TransportOptions,
        clock: SecondsClock,
    ) -> None:
        self.channels: tuple[str, ...] = subscription_channels(channels)
        self.options = options
        self.address = redis_address(redis)
        self.stats = RedisTransportStats()
        #: The latest failed attempt of either link (kept after a success).
        self.last_failure: AttemptFailure | None = None
        self.subscriber = LinkState(SUBSCRIBER, self.address, options, self.stats)
        self.publisher = (
            LinkState(PUBLISHER, self.address, options, self.stats) if publish_enabled else None
        )
        #: Between ``on_subscribed`` and ``on_connection_lost``.
        self.announced = False
        #: ``stop()`` was called.
        self.stopping = False
        #: The caller asked to pause the subscriber's reading.
        self.reading_paused = False
        self._redis = redis
        self._password = redis.password.reveal() if redis.password is not None else None
        self._on_line = on_line
        self._on_subscribed = on_subscribed
        self._on_connection_lost = on_connection_lost
        self._on_attempt_failed = on_attempt_failed
        self._undecodable_warning = RateLimitedWarning(logger, clock, _RATE_LIMIT_PERIOD)
        self._handler_warning = RateLimitedWarning(logger, clock, _RATE_LIMIT_PERIOD)
        self._setname_warning = RateLimitedWarning(logger, clock, _SETNAME_WARNING_PERIOD)
        # channel_name() of each subscribed channel, worked out once.
        self._names: dict[object, str] = {c.encode("utf-8"): c for c in self.channels}

    def link(self, role: Role) -> LinkState:
        """One link's state.

        Raises:
            PublishDisabledError: the publisher of a transport without one.
        """
        if role == SUBSCRIBER:
            return self.subscriber
        if self.publisher is None:
            raise PublishDisabledError("this transport has no publisher")
        return self.publisher

    def setup(self, role: Role) -> tuple[SetupCommand, ...]:
        """What each fresh connection of ``role`` sends (see :func:`setup_sequence`)."""
        return setup_sequence(self._redis, role, self.channels, self.options.client_name)

    def describe(self, error: BaseException, *, redis_reply: bool) -> str:
        """A password-free account of ``error`` (see :func:`describe_failure`)."""
        return describe_failure(error, self._password, redis_reply=redis_reply)

    # --- what the links report -----------------------------------------------------

    def link_ready(self) -> None:
        """A link was set up: maybe the time for ``on_subscribed``."""
        if self.announced or self.stopping or not self.subscriber.ready:
            return
        if self.publisher is not None and not self.publisher.ready:
            return
        self.announced = True
        self._call_back("on_subscribed", self._on_subscribed)

    def link_lost(self, role: Role) -> None:
        """A set-up connection of ``role`` ended (by ``stop()`` too)."""
        if role == SUBSCRIBER and self.announced:
            self.announced = False
            self._call_back("on_connection_lost", self._on_connection_lost)

    def attempt_failed(self, failure: AttemptFailure) -> None:
        """A connection attempt failed before it was set up."""
        self.last_failure = failure
        callback = self._on_attempt_failed
        if callback is not None:
            self._call_back("on_attempt_failed", lambda: callback(failure))

    def setup_refused(self, warning: str) -> None:
        """Redis refused a set-up command that is not fatal (see :meth:`SetupCommand.refused`)."""
        self._setname_warning.warning("%s", warning)

    def message(self, channel: object, data: object) -> None:
        """A pub/sub message arrived on the subscriber: count it, hand it up."""
        stats = self.stats
        stats.messages_received += 1
        if self.stopping:
            return
        line = message_line(data)
        if type(line) is str:
            stats.lines_delivered += 1
            name = self._names.get(channel) if type(channel) is bytes else None
            try:
                self._on_line(channel_name(channel) if name is None else name, line)
            except Exception:  # noqa: BLE001 - the caller's code must not end the connection
                stats.handler_errors += 1
                self._handler_warning.warning(
                    "Redis: on_line raised for a message on %r; the message is skipped",
                    channel_name(channel),
                    exc_info=True,
                )
        elif isinstance(line, BlankMessage):
            stats.blank_messages += 1
        else:
            assert isinstance(line, UndecodableMessage)
            stats.undecodable_messages += 1
            self._undecodable_warning.warning(
                "Redis: skipping a message on %r that is not UTF-8 (%s at byte %d of %d)",
                channel_name(channel),
                line.reason,
                line.position,
                line.length,
            )

    def stop(self) -> bool:
        """``stop()`` was called; True the first time."""
        first, self.stopping = not self.stopping, True
        return first

    # --- publishing ------------------------------------------------------------------

    def publish_payload(self, message: str) -> bytes:
        """The bytes to PUBLISH for ``message``.

        Raises:
            PublishDisabledError: built with ``publish_enabled=False``.
            EncodeError: see :func:`publish_payload`.
        """
        if self.publisher is None:
            raise PublishDisabledError(
                "this RedisTransport was built with publish_enabled=False and cannot publish"
            )
        return publish_payload(message)

    def publisher_unavailable(self) -> NotConnectedError:
        """Counts a publish refused because the publisher is not ready; the error to raise."""
        self.stats.publish_failures += 1
        state = "stopped" if self.stopping else "not connected"
        return NotConnectedError(f"cannot publish: the Redis publisher is {state}")

    def published(self, receivers: object) -> int:
        """Counts a PUBLISH Redis answered; the number of receivers."""
        self.stats.published += 1
        return int(cast(int, receivers))

    def publish_lost(self, why: str) -> NotConnectedError:
        """Counts a PUBLISH whose connection ended before the answer; the error to raise."""
        self.stats.publish_failures += 1
        return NotConnectedError(
            f"the Redis publisher connection was lost before PUBLISH was answered ({why})"
        )

    def publish_refused(self, why: str) -> RedisTransportError:
        """Counts a PUBLISH Redis refused; the error to raise."""
        self.stats.publish_failures += 1
        return RedisTransportError(f"Redis refused PUBLISH: {why}")

    # --- internals ---------------------------------------------------------------------

    def _call_back(self, name: str, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            self.stats.handler_errors += 1
            logger.exception("Redis transport: %s raised", name)


# --- TLS ------------------------------------------------------------------------------------

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


@attrs.frozen
class TlsSettings:
    """The ``redis`` section's TLS, read and checked.

    Attributes:
        server_name: the name the server certificate must carry (``host``).
        verify: check the server certificate (see ``TransportOptions.tls_verify``).
        ca_certificates: PEM blocks of every CA certificate in ``ca_file``
            and in the files of ``ca_path`` (empty when not verifying; empty
            when verifying: the system's CAs).
        certificate_file: the client certificate (then its chain), if any.
        private_key_file: its key; None: the key is in ``certificate_file``.
        client_chain: the PEM blocks of ``certificate_file``, the client's
            own certificate first.
        client_key: the PEM text of the key (not in the repr).
    """

    server_name: str
    verify: bool
    ca_certificates: tuple[bytes, ...] = ()
    certificate_file: str | None = None
    private_key_file: str | None = None
    client_chain: tuple[bytes, ...] = ()
    client_key: bytes | None = attrs.field(default=None, repr=False)

    def key_error(self) -> ConfigError:
        """The error for a client key that cannot be used (never quoting it)."""
        key_file = self.private_key_file or self.certificate_file
        return ConfigError(
            f"'{key_file}' holds no readable private key for the client certificate",
            ("redis", "private_key_file" if self.private_key_file else "certificate_file"),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A client ``ssl.SSLContext`` for these settings (what asyncio takes).

        Raises:
            ConfigError: the client key cannot be used with its certificate.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.verify:
            if self.ca_certificates:
                context.load_verify_locations(cadata=b"\n".join(self.ca_certificates).decode())
            else:
                context.load_default_certs()
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.certificate_file is not None:
            try:
                # The file holds the client certificate, then its chain.
                context.load_cert_chain(
                    self.certificate_file, self.private_key_file, password=_refuse_key_password
                )
            except (OSError, ValueError):  # ssl.SSLError is an OSError
                raise self.key_error() from None
        return context


def _read_pem(file: str, key: str) -> bytes:
    try:
        return Path(file).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read '{file}': {e.strerror or e}", ("redis", key)) from None


def _certificates(data: bytes, file: str, key: str) -> list[bytes]:
    """Each PEM certificate block in ``data``, checked by OpenSSL."""
    found = _PEM_CERTIFICATE.findall(data)
    for block in found:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=block.decode())
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(
                f"'{file}' holds a certificate that cannot be read: {e}", ("redis", key)
            ) from None
    return found


def _ca_certificates(redis: RedisConfig) -> tuple[bytes, ...]:
    """Every CA certificate in ``ca_file`` and in the files of ``ca_path``."""
    found: list[bytes] = []
    if redis.ca_file:
        found += _certificates(_read_pem(redis.ca_file, "ca_file"), redis.ca_file, "ca_file")
        if not found:
            raise ConfigError(f"no PEM certificate in '{redis.ca_file}'", ("redis", "ca_file"))
    if redis.ca_path:
        directory = Path(redis.ca_path)
        if not directory.is_dir():
            raise ConfigError(f"'{redis.ca_path}' is not a directory", ("redis", "ca_path"))
        in_dir: list[bytes] = []
        # Every file, not only OpenSSL's hashed names, which a hand-made
        # directory lacks; such a directory may also hold CRLs and others.
        for file in sorted(p for p in directory.iterdir() if p.is_file()):
            try:
                in_dir += _certificates(file.read_bytes(), str(file), "ca_path")
            except (OSError, ConfigError):
                continue
        if not in_dir:
            raise ConfigError(
                f"no readable PEM certificate in '{redis.ca_path}'", ("redis", "ca_path")
            )
        found += in_dir
    return tuple(found)


def _refuse_key_password() -> bytes:
    # An encrypted key has no password in Synapse's config; never prompt on a TTY.
    raise ValueError("the private key is encrypted")


def tls_settings(redis: RedisConfig, verify: bool) -> TlsSettings | None:
    """The TLS to use for ``redis``, its files read and checked once, here.

    None without TLS: ``use_tls`` is off, or a unix socket ``path`` is set
    (Redis has no TLS on unix sockets; ``use_tls`` is then ignored with a
    warning, as Synapse does).  Turning verification off is warned about.

    Raises:
        ConfigError: a TLS file cannot be read, holds no certificate or no
            usable key, or ``private_key_file`` comes without
            ``certificate_file``.  The key's content is never quoted.
    """
    if redis.path:
        if redis.use_tls:
            logger.warning(
                "Redis: use_tls is ignored with a unix socket path (%s), as in Synapse",
                redis.path,
            )
        return None
    if not redis.use_tls:
        return None
    if redis.private_key_file and not redis.certificate_file:
        raise ConfigError("private_key_file needs certificate_file", ("redis", "private_key_file"))
    chain: tuple[bytes, ...] = ()
    key: bytes | None = None
    if redis.certificate_file:
        cert_pem = _read_pem(redis.certificate_file, "certificate_file")
        chain = tuple(_certificates(cert_pem, redis.certificate_file, "certificate_file"))
        if not chain:
            raise ConfigError(
                f"no PEM certificate in '{redis.certificate_file}'", ("redis", "certificate_file")
            )
        key = (
            _read_pem(redis.private_key_file, "private_key_file")
            if redis.private_key_file
            else cert_pem
        )
    settings = TlsSettings(
        server_name=redis.host,
        verify=verify,
        ca_certificates=_ca_certificates(redis) if verify else (),
        certificate_file=redis.certificate_file,
        private_key_file=redis.private_key_file,
        client_chain=chain,
        client_key=key,
    )
    settings.ssl_context()  # checks the key against its certificate
    if not verify:
        logger.warning(
            "Redis: TLS server certificate verification is off (tls_verify=False) for %s",
            redis.host,
        )
    return settings
