"""The Redis connection pair under replication: subscribe, publish, stay connected.

A Synapse process talks to its cluster through one Redis over two
connections: one SUBSCRIBEs to the replication channels (a subscribed
connection cannot publish), the other PUBLISHes.  :class:`RedisTransport`
keeps such a pair alive on a Twisted reactor with txredisapi's protocol (and
hiredis's reply parser where it is installed) and hands every received
message up as text.  It knows nothing about commands: the caller parses the
lines.

Every rule it follows (options, set-up sequence, backoff, counters, what is
logged when, what a message becomes) is in :mod:`synrepl.connection`; the
modules here only carry them out:

- ``_resp``: the pure-Python reply reader used without hiredis;
- ``_redis_protocol``: one connection (txredisapi's protocol, pub/sub pushes
  taken out, a read loop that can pause between two replies);
- ``_redis_link``: one link's reconnect loop, set-up and keepalive timers;
- ``_redis_endpoint``: TCP, TLS or unix socket endpoints;
- this module: the pair, its callbacks and ``publish()``.

Callbacks
---------
``on_subscribed`` runs once the subscriber has every channel confirmed *and*
the publisher (unless ``publish_enabled=False``) is ready, so the caller can
publish REPLICATE from inside it.  ``on_connection_lost`` runs once when that
subscriber connection ends, including the close made by ``stop()``.  The two
strictly alternate, starting with ``on_subscribed``; failed attempts in
between call neither, but each calls ``on_attempt_failed`` (if given) with
an :class:`~synrepl.connection.AttemptFailure` saying which link and why.
A message that arrives after the subscription is confirmed but before
``on_subscribed`` (the publisher still connecting) is delivered, not held
back.

Bad input and errors
--------------------
Messages that are not UTF-8 are counted and skipped; blank ones are counted
and ignored; an exception from a callback is logged and counted.  None of
these affects the connection.  Such warnings are rate-limited, and message
contents are never logged (a ``USER_IP`` line carries an access token);
neither is the Redis password.

Backpressure
------------
:meth:`RedisTransport.pause_reading` stops reading the subscriber's socket
(including replies already received but not yet handed up, when hiredis is
installed) until :meth:`RedisTransport.resume_reading`; it may be called from
inside ``on_line``.  Keepalive PINGs are suspended meanwhile.  Redis itself
disconnects a subscriber that falls too far behind (its
``client-output-buffer-limit pubsub``); the transport then reconnects, and
the messages in between are lost, as on any reconnect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import txredisapi  # type: ignore[import-untyped]
from twisted.internet import defer
from twisted.python.failure import Failure

from synrepl._ratelimit import RateLimitedWarning
from synrepl.config import RedisConfig
from synrepl.connection import (
    PUBLISHER,
    SUBSCRIBER,
    AttemptFailure,
    BlankMessage,
    LinkState,
    NotConnectedError,
    PublishDisabledError,
    RedisTransportError,
    RedisTransportStats,
    Role,
    SetUp,
    TransportOptions,
    channel_name,
    describe_failure,
    message_line,
    redis_address,
    setup_sequence,
    subscription_channels,
)
from synrepl.errors import EncodeError
from synrepl.twisted._redis_endpoint import make_endpoint
from synrepl.twisted._redis_link import Link
from synrepl.twisted._redis_protocol import HIREDIS, Clock

# The reader's tests compare it with hiredis through this module.
from synrepl.twisted._resp import PythonReader as _PythonReader  # noqa: F401

__all__ = (
    "RedisTransport",
    "RedisTransportStats",
    "RedisTransportError",
    "NotConnectedError",
    "PublishDisabledError",
    "HIREDIS",
)

logger = logging.getLogger("synrepl.redis")

#: Rate-limited warnings (bad messages, callback errors): at most one per period.
_RATE_LIMIT_PERIOD = 10.0


class RedisTransport:
    """A subscribing and a publishing connection to one Redis, kept alive.

    Args:
        reactor: provides IReactorTCP, IReactorUNIX, IReactorTime and
            IReactorPluggableNameResolver; nothing here uses the global one.
        redis: where and how to connect (host/port or unix ``path``, ``dbid``,
            ``username``/``password``, TLS with optional client certificate
            and CA).  ``path`` wins over host and port, and Redis has no TLS
            on unix sockets, so ``use_tls`` is then ignored, as Synapse does.
            ``enabled`` is not looked at: the caller decides whether to use Redis.
        channels: the channels to SUBSCRIBE to (duplicates are dropped).
        on_line: called with ``(channel, message)`` for every non-blank
            UTF-8 message, in the order Redis sent them.
        on_subscribed: called once per connection, after every channel is
            confirmed and the publisher is ready (see the module docs).
        on_connection_lost: called once when that connection ends.
        on_attempt_failed: called for each connection attempt of either link
            that fails before it is set up (refused, TLS, AUTH, SELECT, a
            timeout), so a caller can report why without reading the log.
        publish_enabled: False never opens the publishing connection, and
            :meth:`publish` raises :class:`PublishDisabledError`.
        options: keepalive, timeouts, backoff, client name, TLS verification
            (see :class:`~synrepl.connection.TransportOptions`).

    Raises:
        TypeError, ValueError: ``channels`` is one string, or empty.
        ConfigError: a TLS file cannot be read or holds no certificate/key.
    """

    def __init__(
        self,
        reactor: Any,
        redis: RedisConfig,
        channels: Sequence[str],
        *,
        on_line: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        on_connection_lost: Callable[[], None],
        on_attempt_failed: Callable[[AttemptFailure], None] | None = None,
        publish_enabled: bool = True,
        options: TransportOptions = TransportOptions(),  # noqa: B008 - frozen
    ) -> None:
        self.channels: tuple[str, ...] = subscription_channels(channels)
        #: The options this transport was built with.
        self.options = options
        self._clock: Clock = reactor
        self._redis = redis
        self._on_line = on_line
        self._on_subscribed = on_subscribed
        self._on_connection_lost = on_connection_lost
        self._on_attempt_failed = on_attempt_failed
        self._endpoint = make_endpoint(reactor, redis, options)

        self.stats = RedisTransportStats()
        #: The latest failed connection attempt of either link (None until one
        #: fails; kept after a later success).
        self.last_failure: AttemptFailure | None = None
        self._started = False
        self._stopping: defer.Deferred[None] | None = None
        self._announced = False
        self._reading_paused = False
        self._subscriber = self._make_link(SUBSCRIBER)
        self._publisher = self._make_link(PUBLISHER) if publish_enabled else None
        self._undecodable_warning = RateLimitedWarning(logger, self._clock, _RATE_LIMIT_PERIOD)
        self._handler_warning = RateLimitedWarning(logger, self._clock, _RATE_LIMIT_PERIOD)
        self._setname_warning = RateLimitedWarning(
            logger, self._clock, period=_RATE_LIMIT_PERIOD * 360
        )

    def _make_link(self, role: Role) -> Link:
        state = LinkState(role, self.address, self.options, self.stats)
        setup = setup_sequence(self._redis, role, self.channels, self.options.client_name)
        return Link(self, state, self._clock, self._endpoint, setup)

    # --- public ----------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where Redis is, for log lines (never with credentials)."""
        return redis_address(self._redis)

    @property
    def parser(self) -> str:
        """``"hiredis"`` or ``"python"``: which reply parser is in use."""
        return "hiredis" if HIREDIS else "python"

    @property
    def subscribed(self) -> bool:
        """True between ``on_subscribed`` and ``on_connection_lost``."""
        return self._announced

    @property
    def publisher_ready(self) -> bool:
        """True while :meth:`publish` can send at once."""
        return self._publisher is not None and self._publisher.ready_connection() is not None

    def start(self) -> None:
        """Open the connection(s); they retry until :meth:`stop`.

        Raises:
            RuntimeError: already started (a transport is used once).
        """
        if self._started:
            raise RuntimeError("RedisTransport.start() was already called; make a new one")
        self._started = True
        self._subscriber.start()
        if self._publisher is not None:
            self._publisher.start()

    def stop(self) -> defer.Deferred[None]:
        """Close both connections and stop reconnecting.

        The Deferred fires once both are closed.  A subscribed connection
        still gets its ``on_connection_lost``.  Calling it again returns a
        Deferred for the same outcome.
        """
        if self._stopping is None:
            self._started = True
            links = [self._subscriber] + ([self._publisher] if self._publisher else [])
            done = defer.gatherResults([link.stop() for link in links], consumeErrors=True)
            self._stopping = done.addCallback(lambda _: logger.debug("Redis transport stopped"))
        result: defer.Deferred[None] = defer.Deferred()
        self._stopping.addBoth(lambda r: result.callback(None))
        return result

    def publish(self, channel: str, message: str) -> defer.Deferred[int]:
        """PUBLISH ``message`` on ``channel`` over the publishing connection.

        Returns:
            A Deferred firing with the number of subscribers that received it,
            or failing with :class:`NotConnectedError` (publisher not ready,
            or lost before Redis answered) or :class:`RedisTransportError`
            (Redis refused the command).  Nothing is queued.

        Raises:
            PublishDisabledError: built with ``publish_enabled=False``.
            EncodeError: the message has a newline or cannot be UTF-8 encoded.
        """
        if self._publisher is None:
            raise PublishDisabledError(
                "this RedisTransport was built with publish_enabled=False and cannot publish"
            )
        if "\n" in message:
            raise EncodeError("a replication message must not contain a newline")
        try:
            data = message.encode("utf-8")
        except UnicodeEncodeError as e:
            raise EncodeError(f"message cannot be encoded as UTF-8: {e.reason}") from None
        proto = self._publisher.ready_connection()
        if proto is None:
            self.stats.publish_failures += 1
            state = "stopped" if self._stopping is not None else "not connected"
            return defer.fail(NotConnectedError(f"cannot publish: the Redis publisher is {state}"))
        d = proto.command("PUBLISH", channel, data)
        return d.addCallbacks(self._published, self._publish_failed)

    def pause_reading(self) -> None:
        """Stop reading the subscriber connection until :meth:`resume_reading`."""
        self._reading_paused = True
        self._subscriber.set_paused(True)

    def resume_reading(self) -> None:
        """Read (and deliver) again after :meth:`pause_reading`."""
        self._reading_paused = False
        self._subscriber.set_paused(False)

    def __repr__(self) -> str:
        state = "subscribed" if self._announced else "not subscribed"
        return f"<RedisTransport {self.address} {state}>"

    # --- what the links report (see synrepl.twisted._redis_link.LinkOwner) ---------

    def _describe(self, reason: Failure | BaseException) -> str:
        """A short, password-free account of a failure for log lines."""
        error = cast(BaseException, reason.value) if isinstance(reason, Failure) else reason
        password = self._redis.password.reveal() if self._redis.password is not None else None
        return describe_failure(
            error, password, redis_reply=isinstance(error, txredisapi.ResponseError)
        )

    def _setup_refused(self, message: str) -> None:
        self._setname_warning.warning("%s", message)

    def _link_ready(self, link: Link, setup: SetUp) -> None:
        self._maybe_announce()

    def _link_lost(self, link: Link) -> None:
        if link is self._subscriber and self._announced:
            self._announced = False
            self._call_back("on_connection_lost", self._on_connection_lost)

    def _attempt_failed(self, failure: AttemptFailure) -> None:
        self.last_failure = failure
        callback = self._on_attempt_failed
        if callback is not None:
            self._call_back("on_attempt_failed", lambda: callback(failure))

    def _deliver(self, channel: object, data: object) -> None:
        self.stats.messages_received += 1
        if self._stopping is not None:
            return
        line = message_line(data)
        if isinstance(line, str):
            self.stats.lines_delivered += 1
            try:
                self._on_line(channel_name(channel), line)
            except Exception:  # noqa: BLE001 - the caller's code must not end the connection
                self.stats.handler_errors += 1
                self._handler_warning.warning(
                    "Redis: on_line raised for a message on %r; the message is skipped",
                    channel_name(channel),
                    exc_info=True,
                )
        elif isinstance(line, BlankMessage):
            self.stats.blank_messages += 1
        else:
            self.stats.undecodable_messages += 1
            self._undecodable_warning.warning(
                "Redis: skipping a message on %r that is not UTF-8 (%s at byte %d of %d)",
                channel_name(channel),
                line.reason,
                line.position,
                line.length,
            )

    # --- internals ---------------------------------------------------------------

    def _maybe_announce(self) -> None:
        if self._announced or self._stopping is not None or not self._subscriber.ready:
            return
        if self._publisher is not None and not self._publisher.ready:
            return
        self._announced = True
        self._call_back("on_subscribed", self._on_subscribed)

    def _call_back(self, name: str, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            self.stats.handler_errors += 1
            logger.exception("Redis transport: %s raised", name)

    def _published(self, result: object) -> int:
        self.stats.published += 1
        return int(cast(int, result))

    def _publish_failed(self, failure: Failure) -> Failure:
        self.stats.publish_failures += 1
        if isinstance(failure.value, txredisapi.ConnectionError):
            raise NotConnectedError(
                f"the Redis publisher connection was lost before PUBLISH was answered "
                f"({self._describe(failure)})"
            )
        if isinstance(failure.value, txredisapi.ResponseError):
            raise RedisTransportError(f"Redis refused PUBLISH: {self._describe(failure)}")
        return failure
