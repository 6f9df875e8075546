"""The Redis connection pair under replication: subscribe, publish, stay connected.

A Synapse process talks to its cluster through one Redis over two
connections: one SUBSCRIBEs to the replication channels (a subscribed
connection cannot publish), the other PUBLISHes.  :class:`RedisTransport`
keeps such a pair alive on a Twisted reactor with txredisapi's protocol (and
hiredis's reply parser where it is installed) and hands every received
message up as text.  It knows nothing about commands: the caller parses the
lines.

Every rule it follows (options, set-up sequence, backoff, keepalive,
counters, the callback contract, what is logged when, what a message
becomes) is in :mod:`synrepl.connection` (:class:`~synrepl.connection.TransportState`
holds this transport's share of it); the modules here only carry them out:

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

from synrepl.config import RedisConfig
from synrepl.connection import (
    PUBLISHER,
    SUBSCRIBER,
    AttemptFailure,
    NotConnectedError,
    PublishDisabledError,
    RedisTransportError,
    RedisTransportStats,
    Role,
    SetUp,
    TransportOptions,
    TransportState,
)
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
        self._core = TransportState(
            redis,
            channels,
            on_line=on_line,
            on_subscribed=on_subscribed,
            on_connection_lost=on_connection_lost,
            on_attempt_failed=on_attempt_failed,
            publish_enabled=publish_enabled,
            options=options,
            clock=reactor,
        )
        self.channels: tuple[str, ...] = self._core.channels
        #: The options this transport was built with.
        self.options = options
        self._clock: Clock = reactor
        self._endpoint = make_endpoint(reactor, redis, options)
        #: The transport's counters.
        self.stats: RedisTransportStats = self._core.stats
        self._started = False
        self._stopping: defer.Deferred[None] | None = None
        self._subscriber = self._make_link(SUBSCRIBER)
        self._publisher = self._make_link(PUBLISHER) if publish_enabled else None

    def _make_link(self, role: Role) -> Link:
        core = self._core
        return Link(self, core.link(role), self._clock, self._endpoint, core.setup(role))

    # --- public ----------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where Redis is, for log lines (never with credentials)."""
        return self._core.address

    @property
    def last_failure(self) -> AttemptFailure | None:
        """The latest failed connection attempt of either link (None until
        one fails; kept after a later success)."""
        return self._core.last_failure

    @property
    def parser(self) -> str:
        """``"hiredis"`` or ``"python"``: which reply parser is in use."""
        return "hiredis" if HIREDIS else "python"

    @property
    def subscribed(self) -> bool:
        """True between ``on_subscribed`` and ``on_connection_lost``."""
        return self._core.announced

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
            self._core.stop()
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
        data = self._core.publish_payload(message)
        proto = self._publisher.ready_connection() if self._publisher is not None else None
        if proto is None:
            return defer.fail(self._core.publisher_unavailable())
        d = proto.command("PUBLISH", channel, data)
        return d.addCallbacks(self._core.published, self._publish_failed)

    def pause_reading(self) -> None:
        """Stop reading the subscriber connection until :meth:`resume_reading`."""
        self._core.reading_paused = True
        self._subscriber.set_paused(True)

    def resume_reading(self) -> None:
        """Read (and deliver) again after :meth:`pause_reading`."""
        self._core.reading_paused = False
        self._subscriber.set_paused(False)

    def __repr__(self) -> str:
        state = "subscribed" if self._core.announced else "not subscribed"
        return f"<RedisTransport {self.address} {state}>"

    # --- what the links report (see synrepl.twisted._redis_link.LinkOwner) ---------

    @property
    def _reading_paused(self) -> bool:
        return self._core.reading_paused

    def _describe(self, reason: Failure | BaseException) -> str:
        """A short, password-free account of a failure for log lines."""
        error = cast(BaseException, reason.value) if isinstance(reason, Failure) else reason
        return self._core.describe(error, redis_reply=isinstance(error, txredisapi.ResponseError))

    def _setup_refused(self, message: str) -> None:
        self._core.setup_refused(message)

    def _link_ready(self, link: Link, setup: SetUp) -> None:
        self._core.link_ready()

    def _link_lost(self, link: Link) -> None:
        self._core.link_lost(link.role)

    def _attempt_failed(self, failure: AttemptFailure) -> None:
        self._core.attempt_failed(failure)

    def _deliver(self, channel: object, data: object) -> None:
        self._core.message(channel, data)

    # --- internals ---------------------------------------------------------------

    def _publish_failed(self, failure: Failure) -> Failure:
        if isinstance(failure.value, txredisapi.ConnectionError):
            raise self._core.publish_lost(self._describe(failure))
        if isinstance(failure.value, txredisapi.ResponseError):
            raise self._core.publish_refused(self._describe(failure))
        self.stats.publish_failures += 1
        return failure
