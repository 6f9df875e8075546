"""Running a subcommand on the reactor: stopping, signals, logging, Redis.

- :class:`Session` is how a long-running command ends: Ctrl-C (SIGINT),
  SIGTERM, ``--duration`` or the command itself; a second Ctrl-C exits at once.
- :func:`setup_logging` sends synrepl's log records to stderr as one line
  each, and keeps the Redis transport's connection warnings quiet until the
  first connection, so that an unreachable Redis is reported once, by
  :func:`connect_redis`, with a hint.
- :func:`connect_redis` opens a :class:`RedisTransport` and waits, at most
  ``--connect-timeout`` seconds, for its subscription; it learns why an
  attempt failed from the transport (``on_attempt_failed``), not the log.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import ILogObserver, formatEventAsClassicLogText, globalLogBeginner
from twisted.python.failure import Failure

from synrepl.cli._errors import RuntimeFailure
from synrepl.config import SynapseConfig
from synrepl.connection import AttemptFailure, TransportOptions
from synrepl.twisted.redis_transport import RedisTransport

__all__ = (
    "Session",
    "LogSetup",
    "setup_logging",
    "connect_redis",
    "redis_hint",
    "redis_failure",
    "transport_failure",
    "cli_transport_options",
    "RedisUnreachable",
    "ClientStart",
    "sleep",
)


class Session:
    """When a command stops: a signal, a duration, or the command's own decision.

    Args:
        reactor: the running reactor.
        duration: stop by itself after this many seconds (None: never).
    """

    def __init__(self, reactor: Any, *, duration: float | None = None) -> None:
        self.reactor = reactor
        self._waiters: list[defer.Deferred[str]] = []
        self.reason: str | None = None
        self._interrupts = 0
        self._timer: Any = None
        if duration is not None:
            self._timer = reactor.callLater(duration, self.stop, "duration")
        reactor.callLater(0, self._install_signals)

    @property
    def stopping(self) -> bool:
        """True once something asked the command to stop."""
        return self.reason is not None

    def stop(self, reason: str) -> None:
        """Ask the command to stop (idempotent); ``reason`` says why."""
        if self.reason is not None:
            return
        self.reason = reason
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(reason)

    def wait(self) -> defer.Deferred[str]:
        """Fires with the reason once :meth:`stop` is called."""
        if self.reason is not None:
            return defer.succeed(self.reason)
        d: defer.Deferred[str] = defer.Deferred()
        self._waiters.append(d)
        return d

    def _install_signals(self) -> None:
        # Replaces Twisted's handlers (which would stop the reactor under us):
        # the first signal asks for a clean stop, a second one exits at once.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            os.write(2, b"synrepl: interrupted again; exiting at once\n")
            os._exit(130)
        name = "interrupted" if signum == signal.SIGINT else "terminated"
        self.reactor.callFromThread(self.stop, name)


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "error" if record.levelno >= logging.ERROR else record.levelname.lower()
        text = f"synrepl: {level}: {record.getMessage()}"
        if record.exc_info and LogSetup.debug:
            text += "\n" + self.formatException(record.exc_info)
        return text


class LogSetup(logging.Filter):
    """Holds back what the Redis transport says while the CLI is connecting."""

    debug = False

    def __init__(self) -> None:
        super().__init__()
        #: Hold back Redis connection warnings (until the first connection).
        self.quiet_redis = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            self.quiet_redis and record.name == "synrepl.redis" and record.levelno < logging.ERROR
        )


_setup: LogSetup | None = None


def setup_logging(verbosity: int, *, debug: bool = False) -> LogSetup:
    """Log synrepl's records to stderr, one line each.

    ``verbosity`` 0 shows warnings, 1 info, 2 debug.  Twisted's own log
    (unhandled errors in Deferreds) is shown only with ``debug``.
    """
    global _setup
    setup = LogSetup()
    LogSetup.debug = debug
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbosity, 2)]
    handler.setLevel(level)
    handler.addFilter(setup)
    logger = logging.getLogger("synrepl")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(level)
    # Twisted's log: "Unhandled error in Deferred" and the like.
    observer = _twisted_observer if debug else _ignore
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, observer)], redirectStandardIO=False)
    _setup = setup
    return setup


def _ignore(event: dict[str, Any]) -> None:
    """Twisted's log without --debug: synrepl reports what matters itself."""


def _twisted_observer(event: dict[str, Any]) -> None:
    text = formatEventAsClassicLogText(event)
    if text:
        sys.stderr.write(text)


def current_log_setup() -> LogSetup:
    """The :class:`LogSetup` in force (a fresh one outside the CLI)."""
    return _setup if _setup is not None else LogSetup()


class RedisUnreachable(RuntimeFailure):
    """Redis could not be reached: where, why, and what to do about it."""

    def __init__(self, address: str, reason: str, hint: str) -> None:
        super().__init__(f"cannot connect to Redis at {address}: {reason} ({hint})")
        self.address = address
        self.reason = reason
        self.hint = hint


def redis_failure(address: str, reason: str | None, timeout: float) -> RedisUnreachable:
    """The one-line error for a Redis that could not be reached."""
    if reason is None:
        reason = f"no answer within {timeout:g} s"
    elif "refused" in reason.lower() and "auth" not in reason.lower():
        reason = "connection refused"
    return RedisUnreachable(address, reason, redis_hint(reason))


_NO_ANSWER = "no answer: a firewall, the wrong port, or TLS on one side only (redis.use_tls)?"


def redis_hint(reason: str) -> str:
    """What to do about a Redis connection failure, from its reason."""
    text = reason.lower()
    if "wrongpass" in text or "invalid password" in text or "invalid username" in text:
        return "the password (or username) is wrong: check redis.password / redis.username"
    if "noauth" in text or "authentication required" in text:
        return "this Redis wants a password: set redis.password (or password_path)"
    if "auth failed" in text:
        return "Redis refused AUTH: check redis.password / redis.username"
    if text.startswith("no answer"):  # a set-up timeout names AUTH/SELECT: no refusal
        return _NO_ANSWER
    if "select" in text:
        return "Redis refused SELECT: check redis.dbid"
    if "refused" in text:
        return "is redis-server running there? check redis.host and redis.port (or --redis-url)"
    if "dns" in text or "no address" in text or "name or service" in text:
        return "the host name does not resolve: check redis.host"
    if "no such file" in text:
        return "no socket at that path: check redis.path"
    if "ssl" in text or "tls" in text or "certificate" in text:
        return "TLS failed: check redis.use_tls and the certificate options"
    if "within" in text or "timeout" in text or "timed out" in text:
        return _NO_ANSWER
    return "check the redis section of the config (or --redis-url)"


async def connect_redis(
    reactor: Any,
    config: SynapseConfig,
    *,
    on_line: Callable[[str, str], None],
    timeout: float,
    publish: bool = False,
    channels: Sequence[str] | None = None,
    on_subscribed: Callable[[], None] | None = None,
    client_name: str | None = "synrepl-cli",
    fail_fast: bool = True,
) -> RedisTransport:
    """Connect to the cluster's Redis and subscribe to its channels.

    Subscribes to ``<server_name>`` and ``<server_name>/USER_IP`` unless
    ``channels`` says otherwise.  ``on_subscribed`` runs on every
    (re)subscription, after the first one too.  With ``fail_fast`` the first
    attempt that fails outright (refused, AUTH, ...) is final; otherwise
    attempts go on until ``timeout``.

    Raises:
        RuntimeFailure: not subscribed within ``timeout`` seconds; the
            message says why, with a hint.
    """
    setup = current_log_setup()
    first: defer.Deferred[None] = defer.Deferred()

    def subscribed() -> None:
        if on_subscribed is not None:
            on_subscribed()
        if not first.called:
            first.callback(None)  # resumes the caller at once

    def attempt_failed(failure: AttemptFailure) -> None:
        if fail_fast and not first.called:
            reactor.callLater(0, first.cancel)

    transport = RedisTransport(
        reactor,
        config.redis,
        channels or [config.server_name, f"{config.server_name}/USER_IP"],
        on_line=on_line,
        on_subscribed=subscribed,
        on_connection_lost=lambda: None,
        on_attempt_failed=attempt_failed,
        publish_enabled=publish,
        options=cli_transport_options(timeout, client_name),
    )
    setup.quiet_redis = True
    transport.start()
    await _first_subscription(reactor, first, timeout, transport, transport.stop)
    return transport


async def _first_subscription(
    reactor: Any,
    first: defer.Deferred[None],
    timeout: float,
    transport: RedisTransport,
    stop: Callable[[], Awaitable[object]],
) -> None:
    """Wait for ``first`` (the first subscription) at most ``timeout`` seconds,
    then let the transport's warnings through again (the caller quieted them).

    Raises:
        RedisUnreachable: not in time (``stop`` has been awaited).
    """
    timer = reactor.callLater(timeout, first.cancel)
    try:
        await first
    except defer.CancelledError:
        await stop()
        raise transport_failure(transport, timeout) from None
    finally:
        if timer.active():
            timer.cancel()
    current_log_setup().quiet_redis = False


def cli_transport_options(timeout: float, client_name: str | None) -> TransportOptions:
    """Transport options for a command that gives up after ``timeout`` seconds:
    attempts and waits short enough to try several times within it."""
    backoff = TransportOptions().min_backoff
    return TransportOptions(
        connect_timeout=min(timeout, 10.0),
        max_backoff=max(backoff, min(2.0, timeout)),  # a tiny timeout must not refuse it
        client_name=client_name,
    )


class ClientStart:
    """Starting a command's ReplicationClient: at most ``timeout`` seconds for
    its first subscription, and the first failed attempt is final, as in
    :func:`connect_redis` (pass :meth:`attempt_failed` as the client's
    ``on_connection_failure``).

    Args:
        reactor: the running reactor.
        timeout: ``--connect-timeout``, in seconds.
    """

    def __init__(self, reactor: Any, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._started: defer.Deferred[None] | None = None
        #: Why the client stopped delivering by itself (None: it did not).
        self.stopped_because: str | None = None

    def attempt_failed(self, failure: AttemptFailure) -> None:
        """Give up at once: the client's first connection attempt failed."""
        if self._started is not None and not self._started.called:
            self._reactor.callLater(0, self._started.cancel)

    async def start(self, client: Any, session: Session) -> None:
        """Start ``client`` and wait for its subscription; should delivery
        later stop by itself, note why (:attr:`stopped_because`) and stop
        ``session``.

        Raises:
            RedisUnreachable: Redis did not subscribe it in time (the client
                is stopped).
        """
        current_log_setup().quiet_redis = True
        self._started = client.start()
        await _first_subscription(
            self._reactor, self._started, self._timeout, client.transport, client.stop
        )

        def finished(result: object) -> None:
            if isinstance(result, Failure):
                self.stopped_because = result.getErrorMessage()
                session.stop("failed")

        client.finished().addBoth(finished)


def transport_failure(transport: RedisTransport, timeout: float) -> RedisUnreachable:
    """The one-line error for a transport that did not subscribe in time."""
    failure = transport.last_failure
    return redis_failure(transport.address, failure.reason if failure else None, timeout)


async def sleep(reactor: Any, seconds: float) -> None:
    """Wait ``seconds`` on the reactor."""
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d
