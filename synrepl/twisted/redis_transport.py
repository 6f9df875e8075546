"""The Redis connection pair under replication: subscribe, publish, stay connected.

A Synapse process talks to its cluster through one Redis over two
connections: one SUBSCRIBEs to the replication channels (a subscribed
connection cannot publish), the other PUBLISHes.  :class:`RedisTransport`
keeps such a pair alive with txredisapi's protocol (and hiredis's reply
parser where it is installed) and hands every received message up as text.
It knows nothing about commands: the caller parses the lines.

Theory of operation
-------------------
Each connection is a *link* running one loop until :meth:`RedisTransport.stop`:

    connect (TCP, TLS or unix socket)
      -> set up: AUTH, SELECT, CLIENT SETNAME, and SUBSCRIBE on the
         subscriber, all answered within ``connect_timeout``
      -> ready: a PING every ``keepalive_interval``; no answer within
         ``keepalive_timeout`` aborts the connection (this is what notices a
         Redis that hangs or a network that drops packets silently)
      -> lost -> wait (exponential backoff from ``min_backoff`` up to
         ``max_backoff``, each wait randomly shortened by up to half) -> connect

Any failure (refused, TLS, AUTH, SELECT, a timeout) ends only the attempt,
never the loop.  AUTH and SELECT are sent here rather than handed to
txredisapi, because txredisapi stops reconnecting for good when either
fails (Synapse issue #9351).

Callbacks
---------
``on_subscribed`` runs once the subscriber has every channel confirmed *and*
the publisher (unless ``publish_enabled=False``) is ready, so the caller can
publish REPLICATE from inside it.  ``on_connection_lost`` runs once when that
subscriber connection ends, including the close made by ``stop()``.  The two
strictly alternate, starting with ``on_subscribed``; failed attempts in
between call neither.  A message that arrives after the subscription is
confirmed but before ``on_subscribed`` (the publisher still connecting) is
delivered, not held back.

Bad input and errors
--------------------
Messages that are not UTF-8 are counted and skipped; blank ones are counted
and ignored; an exception from a callback is logged and counted.  None of
these affects the connection.  Such warnings are rate-limited, and message
contents are never logged (a ``USER_IP`` line carries an access token);
neither is the Redis password.

Connection trouble is logged once per change of state: "lost" or "cannot
connect" once, "still cannot connect" at most every ``down_log_interval``
seconds, "reconnected" once; each attempt in between only at DEBUG level.

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
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, cast

import attrs
import txredisapi  # type: ignore[import-untyped]
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from synrepl.config import RedisConfig
from synrepl.errors import ConfigError, EncodeError, SynreplError
from synrepl.twisted._ratelimit import RateLimitedWarning

__all__ = (
    "RedisTransport",
    "RedisTransportStats",
    "RedisTransportError",
    "NotConnectedError",
    "PublishDisabledError",
    "HIREDIS",
)

logger = logging.getLogger("synrepl.redis")

#: True when txredisapi parses replies with hiredis (the C parser).
HIREDIS: Final[bool] = txredisapi.hiredis is not None and issubclass(
    txredisapi.RedisProtocol, txredisapi.HiredisProtocol
)

#: Rate-limited warnings (bad messages, callback errors): at most one per period.
_RATE_LIMIT_PERIOD = 10.0
#: Longest failure description put in a log line.
_REASON_LIMIT = 300

SUBSCRIBER: Final = "subscriber"
PUBLISHER: Final = "publisher"


class _DelayedCall(Protocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class _Clock(Protocol):
    """The part of _Clock used here (zope interfaces do not type-check)."""

    def seconds(self) -> float: ...
    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> _DelayedCall: ...


class RedisTransportError(SynreplError):
    """Base of the errors :class:`RedisTransport` raises."""


class NotConnectedError(RedisTransportError, ConnectionError):
    """The publishing connection is not ready (connecting, reconnecting or stopped),
    or it was lost before Redis answered."""


class PublishDisabledError(RedisTransportError, RuntimeError):
    """:meth:`RedisTransport.publish` was called on a transport built with
    ``publish_enabled=False``."""


@attrs.define
class RedisTransportStats:
    """Counters of one :class:`RedisTransport`; they only ever grow."""

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


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


class _PythonReader:
    """RESP2 with ``hiredis.Reader``'s ``feed()``/``gets()`` interface.

    Used when hiredis is missing, instead of txredisapi's own line parser,
    which pauses and resumes the transport by itself and so cannot honour
    :meth:`RedisTransport.pause_reading`.  Like hiredis without an encoding,
    it returns bytes for strings, int, None, lists, and a
    ``txredisapi.ResponseError`` for an error reply.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def gets(self) -> object:
        """The next complete reply, or False if there is none yet."""
        try:
            reply, self._pos = self._parse(self._pos)
        except _Incomplete:
            return False
        if self._pos == len(self._buffer) or self._pos > 65536:
            del self._buffer[: self._pos]
            self._pos = 0
        return reply

    def _parse(self, pos: int) -> tuple[object, int]:
        buffer = self._buffer
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        kind, line, pos = buffer[pos], bytes(buffer[pos + 1 : end]), end + 2
        if kind == 0x2B:  # +
            return line, pos
        if kind == 0x2D:  # -
            return txredisapi.ResponseError(line.decode("utf-8", "replace")), pos
        try:
            number = int(line)
        except ValueError:
            raise txredisapi.InvalidData(f"bad length or integer {line[:40]!r}") from None
        if kind == 0x3A:  # :
            return number, pos
        if kind == 0x24:  # $
            if number < 0:
                return None, pos
            if len(buffer) < pos + number + 2:
                raise _Incomplete
            return bytes(buffer[pos : pos + number]), pos + number + 2
        if kind == 0x2A:  # *
            if number < 0:
                return None, pos
            items = []
            for _ in range(number):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        raise txredisapi.InvalidData(f"unknown reply type {chr(kind)!r}")


class _RedisConnection(txredisapi.RedisProtocol):  # type: ignore[misc]
    """One Redis connection of a link.

    Replies to our own commands go to txredisapi's reply queue as usual;
    pub/sub pushes (``message``, ``subscribe``) are taken out before that.
    Values stay bytes (no charset, no number conversion), so the transport
    decides how to decode a message.  Parsing is hiredis's reader where
    installed, else :class:`_PythonReader`; either way this class runs the
    read loop, so that pausing stops delivery between two replies.
    """

    def __init__(self, link: _Link) -> None:
        super().__init__(
            charset=None, replyTimeout=None, password=None, dbid=None, convertNumbers=False
        )
        # txredisapi's pure-Python parser schedules through a class attribute
        # bound to the global reactor; use ours.
        self.callLater = link.clock.callLater
        if not HIREDIS:
            self._reader = _PythonReader()
        self._link = link
        #: Why we closed this connection ourselves (setup error, timeout, stop).
        self.close_reason: str | None = None
        self.lost_reason: Failure | None = None
        self._draining = False
        self._unconfirmed: set[bytes] = set()
        self._subscribing: defer.Deferred[None] | None = None

    # --- commands ------------------------------------------------------------

    def command(self, *args: str | bytes | int) -> defer.Deferred[object]:
        """Send one command; the Deferred fires with its reply or fails."""
        return cast(
            "defer.Deferred[object]",
            defer.maybeDeferred(self.execute_command, *args, apply_timeout=False),
        )

    def subscribe(self, channels: Sequence[str]) -> defer.Deferred[None]:
        """SUBSCRIBE; fires once Redis has confirmed every channel."""
        self._unconfirmed = {c.encode("utf-8") for c in channels}
        d: defer.Deferred[None] = defer.Deferred()
        self._subscribing = d
        # The confirmations are pushes, not one reply: they bypass the queue.
        self.transport.write(self._build_command("SUBSCRIBE", *channels))
        return d

    def close(self, reason: str, *, abort: bool = False) -> None:
        """Close on purpose, remembering why; nothing more is handed up."""
        if self.close_reason is None:
            self.close_reason = reason
        if self.transport is None or self.lost_reason is not None:
            return
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None and self.lost_reason is None:
            self.transport.abortConnection()

    # --- incoming --------------------------------------------------------------

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        if data:
            self._reader.feed(data)
        if self._draining:  # re-entered from resumeProducing inside a callback
            return
        self._draining = True
        try:
            while not self.paused and self.close_reason is None:
                try:
                    reply = self._reader.gets()
                except Exception as e:  # noqa: BLE001 - any parser error ends the stream
                    self.close(f"Redis sent an unreadable reply: {e}", abort=True)
                    return
                if reply is False:
                    return
                self.replyReceived(reply)
        finally:
            self._draining = False

    def replyReceived(self, reply: object) -> None:
        if isinstance(reply, list) and len(reply) == 3:
            kind = reply[0]
            if kind in (b"message", "message"):
                if self.close_reason is None:
                    self._link.transport._deliver(reply[1], reply[2])
                return
            if kind in (b"subscribe", "subscribe"):
                self._confirmed(reply[1])
                return
        self.replyQueue.put(reply)

    def _confirmed(self, channel: object) -> None:
        if isinstance(channel, str):
            channel = channel.encode("utf-8")
        self._unconfirmed.discard(cast(bytes, channel))
        if not self._unconfirmed and self._subscribing is not None:
            d, self._subscribing = self._subscribing, None
            d.callback(None)

    def resumeProducing(self) -> None:
        self.paused = False
        self.transport.resumeProducing()
        self.dataReceived(b"")

    def connectionLost(self, reason: Failure) -> None:
        self.lost_reason = reason
        pending, self._subscribing = self._subscribing, None
        super().connectionLost(reason)
        if pending is not None:
            pending.errback(txredisapi.ConnectionError("Lost connection"))
        self._link.connection_lost(self, reason)


class _OneShotFactory(ClientFactory):
    """Hands an endpoint the protocol instance already made for this attempt."""

    def __init__(self, protocol: _RedisConnection) -> None:
        self._protocol: _RedisConnection | None = protocol

    def buildProtocol(self, addr: object) -> TwistedProtocol | None:
        # Once only: a second connection (a racing address) is refused.
        protocol, self._protocol = self._protocol, None
        return cast("TwistedProtocol | None", protocol)


class _Link:
    """One connection of the pair and its reconnect loop (see the module docs)."""

    def __init__(self, transport: RedisTransport, role: str) -> None:
        self.transport = transport
        self.role = role
        self.clock: _Clock = transport._clock
        self.current: _RedisConnection | None = None
        self.ready = False
        self._stopped = False
        self._connecting: defer.Deferred[object] | None = None
        self._retry: _DelayedCall | None = None
        self._setup_timer: _DelayedCall | None = None
        self._keepalive: LoopingCall | None = None
        self._ping_timer: _DelayedCall | None = None
        self._ping_outstanding = False
        self._ever_ready = False
        self._failures = 0  # consecutive failed attempts since the last set-up
        self._down_since: float | None = None
        self._down_logged = False
        self._last_down_log = 0.0
        self._closed_waiters: list[defer.Deferred[None]] = []

    # --- the loop ----------------------------------------------------------------

    def start(self) -> None:
        self._connect()

    def _connect(self) -> None:
        self._retry = None
        if self._stopped:
            return
        proto = _RedisConnection(self)
        self.current = proto
        logger.debug("Redis %s: connecting to %s", self.role, self.transport.address)
        d: defer.Deferred[object] = defer.maybeDeferred(
            self.transport._endpoint.connect, _OneShotFactory(proto)
        )
        self._connecting = d
        d.addCallbacks(
            self._connected, self._connect_failed, callbackArgs=(proto,), errbackArgs=(proto,)
        )

    def _connected(self, _: object, proto: _RedisConnection) -> None:
        self._connecting = None
        if proto is not self.current or proto.lost_reason is not None:
            return
        timeout = self.transport._connect_timeout
        self._setup_timer = self.clock.callLater(timeout, self._setup_timed_out, proto, timeout)
        d = defer.ensureDeferred(self._set_up(proto))
        d.addCallbacks(
            self._set_up_done, self._set_up_failed, callbackArgs=(proto,), errbackArgs=(proto,)
        )

    async def _set_up(self, proto: _RedisConnection) -> None:
        t = self.transport
        password = t._redis.password.reveal() if t._redis.password is not None else ""
        if password:
            auth: tuple[str, ...] = ("AUTH", password)
            if t._redis.username:
                auth = ("AUTH", t._redis.username, password)
            await _step("AUTH", proto.command(*auth))
        if t._redis.dbid is not None:
            await _step(f"SELECT {t._redis.dbid}", proto.command("SELECT", t._redis.dbid))
        if t._client_name is not None:
            try:
                await proto.command("CLIENT", "SETNAME", f"{t._client_name}-{self.role[:3]}")
            except txredisapi.ResponseError as e:  # an ACL may forbid it: not fatal
                t._setname_warning.warning("Redis refused CLIENT SETNAME: %s", e)
        if self.role == SUBSCRIBER:
            await proto.subscribe(t.channels)

    def _set_up_done(self, _: object, proto: _RedisConnection) -> None:
        self._cancel_setup_timer()
        if proto is not self.current or proto.close_reason is not None:
            return
        now = self.clock.seconds()
        if not self._ever_ready:
            logger.info(
                "Redis %s: connected to %s%s",
                self.role,
                self.transport.address,
                f" after {self._failures} failed attempts" if self._failures else "",
            )
        elif self._down_since is not None:
            logger.info(
                "Redis %s: reconnected to %s after %.1f s down (%d failed attempts)",
                self.role,
                self.transport.address,
                now - self._down_since,
                self._failures,
            )
        was_ready_before = self._ever_ready
        self.ready = True
        self._ever_ready = True
        self._failures = 0
        self._down_since = None
        self._down_logged = False
        self._ping_outstanding = False
        self._start_keepalive()
        if self.role == SUBSCRIBER and self.transport._reading_paused:
            proto.pauseProducing()
        self.transport._link_ready(self, was_ready_before)

    def _set_up_failed(self, failure: Failure, proto: _RedisConnection) -> None:
        self._cancel_setup_timer()
        if proto.lost_reason is None:
            # Still open, so the failure is Redis's answer (AUTH, SELECT, ...):
            # close, and connection_lost retries.
            proto.close(self.transport._describe(failure), abort=True)
        # Otherwise the connection is gone and connection_lost handles it.

    def _setup_timed_out(self, proto: _RedisConnection, timeout: float) -> None:
        self._setup_timer = None
        proto.close(f"no answer to AUTH/SELECT/SUBSCRIBE within {timeout:g} s", abort=True)

    def _cancel_setup_timer(self) -> None:
        if self._setup_timer is not None and self._setup_timer.active():
            self._setup_timer.cancel()
        self._setup_timer = None

    def _connect_failed(self, failure: Failure, proto: _RedisConnection) -> None:
        self._connecting = None
        if proto is self.current:
            self.current = None
        if self._stopped:
            return
        self._attempt_failed(self.transport._describe(failure))

    def connection_lost(self, proto: _RedisConnection, reason: Failure) -> None:
        if proto is not self.current:
            return
        self.current = None
        self._cancel_setup_timer()
        self._stop_keepalive()
        was_ready, self.ready = self.ready, False
        why = proto.close_reason or self.transport._describe(reason)
        if self._stopped:
            self.transport._link_lost(self, was_ready, stopping=True)
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)
            return
        if was_ready:
            now = self.clock.seconds()
            logger.warning(
                "Redis %s: connection to %s lost (%s); reconnecting",
                self.role,
                self.transport.address,
                why,
            )
            self._down_since, self._down_logged, self._last_down_log = now, True, now
            self.transport._link_lost(self, was_ready, stopping=False)
            self._schedule_retry()
        else:
            self._attempt_failed(why)

    def _attempt_failed(self, why: str) -> None:
        self._failures += 1
        self.transport.stats.failed_attempts += 1
        now = self.clock.seconds()
        if self._down_since is None:
            self._down_since = now
        address = self.transport.address
        if not self._down_logged:
            self._down_logged, self._last_down_log = True, now
            logger.warning("Redis %s: cannot connect to %s (%s); retrying", self.role, address, why)
        elif now - self._last_down_log >= self.transport._down_log_interval:
            self._last_down_log = now
            logger.warning(
                "Redis %s: still cannot connect to %s after %d attempts over %.0f s "
                "(last error: %s)",
                self.role,
                address,
                self._failures,
                now - self._down_since,
                why,
            )
        else:
            logger.debug("Redis %s: attempt %d failed: %s", self.role, self._failures, why)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._stopped:
            return
        t = self.transport
        base = min(t._max_backoff, t._min_backoff * 2 ** min(self._failures, 32))
        delay = base * (1.0 - t._rng.random() / 2)
        self._retry = self.clock.callLater(delay, self._connect)

    # --- keepalive -------------------------------------------------------------

    def _start_keepalive(self) -> None:
        self._stop_keepalive()
        loop = LoopingCall(self._ping)
        loop.clock = cast(Any, self.clock)
        self._keepalive = loop
        loop.start(self.transport._keepalive_interval, now=False).addErrback(
            lambda f: logger.error("Redis %s: keepalive failed: %s", self.role, f.value)
        )

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        self._cancel_ping_timer()
        self._ping_outstanding = False

    def _cancel_ping_timer(self) -> None:
        if self._ping_timer is not None and self._ping_timer.active():
            self._ping_timer.cancel()
        self._ping_timer = None

    def _ping(self) -> None:
        proto = self.current
        if proto is None or not self.ready or self._ping_outstanding or proto.paused:
            return
        self._ping_outstanding = True
        self._arm_ping_timer(proto)
        proto.command("PING").addBoth(self._pong, proto)

    def _arm_ping_timer(self, proto: _RedisConnection) -> None:
        timeout = self.transport._keepalive_timeout
        self._ping_timer = self.clock.callLater(timeout, self._ping_timed_out, proto, timeout)

    def _pong(self, _: object, proto: _RedisConnection) -> None:
        # Any answer, even an error reply, shows the connection is alive; a
        # lost connection is handled by connection_lost.
        if proto is self.current:
            self._ping_outstanding = False
            self._cancel_ping_timer()

    def _ping_timed_out(self, proto: _RedisConnection, timeout: float) -> None:
        self._ping_timer = None
        if proto is not self.current:
            return
        self.transport.stats.keepalive_timeouts += 1
        proto.close(f"no answer to PING within {timeout:g} s", abort=True)

    def set_paused(self, paused: bool) -> None:
        proto = self.current
        if proto is None or not self.ready:
            return  # applied once the next connection is set up
        if paused and not proto.paused:
            proto.pauseProducing()
            self._cancel_ping_timer()  # its answer cannot be read now
        elif not paused and proto.paused:
            proto.resumeProducing()
            if self._ping_outstanding and self._ping_timer is None and proto is self.current:
                self._arm_ping_timer(proto)

    # --- stop --------------------------------------------------------------------

    def stop(self) -> defer.Deferred[None]:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._cancel_setup_timer()
        self._stop_keepalive()
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            self.current = None
            connecting.cancel()
            return defer.succeed(None)
        proto = self.current
        if proto is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(d)
        proto.close("stopped")
        # A peer that never completes the close (TLS) must not hang stop().
        force = self.clock.callLater(self.transport._connect_timeout, proto.abort)

        def _cancel_force(result: None) -> None:
            if force.active():
                force.cancel()
            return result

        d.addBoth(_cancel_force)
        return d

    def ready_connection(self) -> _RedisConnection | None:
        return self.current if self.ready and not self._stopped else None


async def _step(what: str, d: defer.Deferred[object]) -> object:
    """Await a set-up command, naming it in the error if Redis refuses it."""
    try:
        return await d
    except txredisapi.ResponseError as e:
        raise RedisTransportError(f"{what} failed: {e}") from None


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
        publish_enabled: False never opens the publishing connection, and
            :meth:`publish` raises :class:`PublishDisabledError`.
        keepalive_interval: seconds between PINGs on each ready connection.
        keepalive_timeout: seconds a PING may go unanswered before the
            connection is aborted and re-made.
        connect_timeout: seconds for the TCP/TLS connect, again for the
            set-up commands (AUTH, SELECT, SUBSCRIBE), and for ``stop()`` to
            wait for a clean close before it aborts the connection.
        min_backoff, max_backoff: the first and the largest wait between
            attempts, in seconds; each wait is randomly shortened by up to half.
        client_name: if set, each connection is named ``<client_name>-sub`` or
            ``-pub`` (CLIENT SETNAME) so operators can find it in CLIENT LIST.
        tls_verify: check the server certificate against ``ca_file`` /
            ``ca_path`` (or the system's CAs) and the host name.  Synapse does
            not verify at all; pass False only to match that on a trusted
            network.
        down_log_interval: while a connection stays down, how often to log
            that it still is.

    Raises:
        ValueError: an argument is out of range.
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
        publish_enabled: bool = True,
        keepalive_interval: float = 30.0,
        keepalive_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        client_name: str | None = None,
        tls_verify: bool = True,
        down_log_interval: float = 60.0,
    ) -> None:
        if isinstance(channels, str):
            raise TypeError("channels must be a sequence of channel names, not one string")
        unique = list(dict.fromkeys(channels))
        if not unique or not all(isinstance(c, str) and c for c in unique):
            raise ValueError(f"channels must be non-empty strings, got {list(channels)!r}")
        for name, value in (
            ("keepalive_interval", keepalive_interval),
            ("keepalive_timeout", keepalive_timeout),
            ("connect_timeout", connect_timeout),
            ("min_backoff", min_backoff),
            ("down_log_interval", down_log_interval),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be more than 0, got {value!r}")
        if not max_backoff >= min_backoff:
            raise ValueError(
                f"max_backoff ({max_backoff!r}) must not be below min_backoff ({min_backoff!r})"
            )
        if client_name is not None and (not client_name or re.search(r"\s", client_name)):
            raise ValueError(f"client_name must be non-empty without spaces, got {client_name!r}")

        self._clock: _Clock = reactor
        self._redis = redis
        self.channels: tuple[str, ...] = tuple(unique)
        self._on_line = on_line
        self._on_subscribed = on_subscribed
        self._on_connection_lost = on_connection_lost
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        self._connect_timeout = connect_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._client_name = client_name
        self._down_log_interval = down_log_interval
        self._rng = random.Random()
        self._endpoint = self._make_endpoint(reactor, tls_verify)

        self.stats = RedisTransportStats()
        self._subscriber = _Link(self, SUBSCRIBER)
        self._publisher = _Link(self, PUBLISHER) if publish_enabled else None
        self._started = False
        self._stopping: defer.Deferred[None] | None = None
        self._announced = False
        self._reading_paused = False
        self._undecodable_warning = RateLimitedWarning(logger, self._clock, _RATE_LIMIT_PERIOD)
        self._handler_warning = RateLimitedWarning(logger, self._clock, _RATE_LIMIT_PERIOD)
        self._setname_warning = RateLimitedWarning(
            logger, self._clock, period=_RATE_LIMIT_PERIOD * 360
        )

    # --- public ----------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where Redis is, for log lines (never with credentials)."""
        r = self._redis
        if r.path:
            return f"unix:{r.path}"
        host = f"[{r.host}]" if ":" in r.host else r.host
        return f"{host}:{r.port}{' (TLS)' if r.use_tls else ''}"

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

    # --- link events -------------------------------------------------------------

    def _link_ready(self, link: _Link, reconnect: bool) -> None:
        if link is self._subscriber:
            self.stats.connects += 1
            if reconnect:
                self.stats.reconnects += 1
        else:
            self.stats.publisher_connects += 1
        self._maybe_announce()

    def _maybe_announce(self) -> None:
        if self._announced or self._stopping is not None or not self._subscriber.ready:
            return
        if self._publisher is not None and not self._publisher.ready:
            return
        self._announced = True
        self._call_back("on_subscribed", self._on_subscribed)

    def _link_lost(self, link: _Link, was_ready: bool, *, stopping: bool) -> None:
        if was_ready and not stopping:
            if link is self._subscriber:
                self.stats.connection_losses += 1
            else:
                self.stats.publisher_losses += 1
        if link is self._subscriber and self._announced:
            self._announced = False
            self._call_back("on_connection_lost", self._on_connection_lost)

    def _call_back(self, name: str, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            self.stats.handler_errors += 1
            logger.exception("Redis transport: %s raised", name)

    def _deliver(self, channel: object, data: object) -> None:
        self.stats.messages_received += 1
        if self._stopping is not None:
            return
        channel_name = _text(channel, "replace")
        try:
            line = _text(data, "strict")
        except UnicodeDecodeError as e:
            self.stats.undecodable_messages += 1
            self._undecodable_warning.warning(
                "Redis: skipping a message on %r that is not UTF-8 (%s at byte %d of %d)",
                channel_name,
                e.reason,
                e.start,
                len(e.object),
            )
            return
        if not line.strip():
            self.stats.blank_messages += 1
            return
        self.stats.lines_delivered += 1
        try:
            self._on_line(channel_name, line)
        except Exception:  # noqa: BLE001 - the caller's code must not end the connection
            self.stats.handler_errors += 1
            self._handler_warning.warning(
                "Redis: on_line raised for a message on %r; the message is skipped",
                channel_name,
                exc_info=True,
            )

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

    def _describe(self, reason: Failure | BaseException) -> str:
        """A short, password-free account of a failure for log lines."""
        error = reason.value if isinstance(reason, Failure) else reason
        text = str(error).strip() or type(error).__name__
        if not isinstance(error, (RedisTransportError, txredisapi.ResponseError)):
            text = f"{type(error).__name__}: {text}"
        password = self._redis.password.reveal() if self._redis.password is not None else ""
        if password:
            text = text.replace(password, "***")
        if len(text) > _REASON_LIMIT:
            text = text[:_REASON_LIMIT] + "..."
        return text

    # --- endpoints ---------------------------------------------------------------

    def _make_endpoint(self, reactor: Any, tls_verify: bool) -> Any:
        """An IStreamClientEndpoint (typed Any: zope interfaces do not type-check)."""
        r = self._redis
        if r.path:
            if r.use_tls:
                logger.warning(
                    "Redis: use_tls is ignored with a unix socket path (%s), as in Synapse",
                    r.path,
                )
            return UNIXClientEndpoint(  # type: ignore[no-untyped-call]
                reactor, r.path, timeout=self._connect_timeout
            )
        tcp = HostnameEndpoint(reactor, r.host, r.port, timeout=self._connect_timeout)
        if not r.use_tls:
            return tcp
        return wrapClientTLS(_tls_options(r, tls_verify), cast(Any, tcp), clock=reactor)


# --- TLS ---------------------------------------------------------------------

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _read_pem(file: str, key: str) -> bytes:
    try:
        return Path(file).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read '{file}': {e.strerror or e}", ("redis", key)) from None


def _certificates(data: bytes, file: str, key: str) -> list[tuple[bytes, ssl.Certificate]]:
    """Each PEM certificate in ``data``, as (PEM block, parsed)."""
    found = []
    for block in _PEM_CERTIFICATE.findall(data):
        try:
            found.append((block, ssl.Certificate.loadPEM(block)))
        except Exception as e:  # noqa: BLE001 - OpenSSL has many ways to refuse
            raise ConfigError(
                f"'{file}' holds a certificate that cannot be read: {e}", ("redis", key)
            ) from None
    return found


def _ca_certificates(redis: RedisConfig) -> list[ssl.Certificate]:
    """Every CA certificate in ``ca_file`` and in the files of ``ca_path``."""
    found: list[tuple[bytes, ssl.Certificate]] = []
    if redis.ca_file:
        found += _certificates(_read_pem(redis.ca_file, "ca_file"), redis.ca_file, "ca_file")
        if not found:
            raise ConfigError(f"no PEM certificate in '{redis.ca_file}'", ("redis", "ca_file"))
    if redis.ca_path:
        directory = Path(redis.ca_path)
        if not directory.is_dir():
            raise ConfigError(f"'{redis.ca_path}' is not a directory", ("redis", "ca_path"))
        in_dir: list[tuple[bytes, ssl.Certificate]] = []
        for file in sorted(p for p in directory.iterdir() if p.is_file()):
            try:  # an OpenSSL CA directory may also hold CRLs and other files
                in_dir += _certificates(file.read_bytes(), str(file), "ca_path")
            except (OSError, ConfigError):
                continue
        if not in_dir:
            raise ConfigError(
                f"no readable PEM certificate in '{redis.ca_path}'", ("redis", "ca_path")
            )
        found += in_dir
    return [cert for _, cert in found]


def _tls_options(redis: RedisConfig, verify: bool) -> IOpenSSLClientConnectionCreator:
    """TLS client options from the ``redis`` section; files are read once, here."""
    client: ssl.PrivateCertificate | None = None
    chain: list[Any] = []
    if redis.private_key_file and not redis.certificate_file:
        raise ConfigError("private_key_file needs certificate_file", ("redis", "private_key_file"))
    if redis.certificate_file:
        cert_pem = _read_pem(redis.certificate_file, "certificate_file")
        certs = _certificates(cert_pem, redis.certificate_file, "certificate_file")
        if not certs:
            raise ConfigError(
                f"no PEM certificate in '{redis.certificate_file}'", ("redis", "certificate_file")
            )
        key_file = redis.private_key_file or redis.certificate_file
        key_pem = _read_pem(key_file, "private_key_file") if redis.private_key_file else cert_pem
        try:
            client = ssl.PrivateCertificate.loadPEM(  # type: ignore[no-untyped-call]
                certs[0][0] + b"\n" + key_pem
            )
        except Exception:  # noqa: BLE001 - OpenSSL has many ways to refuse
            # Never quote the key file's content or OpenSSL's view of it.
            raise ConfigError(
                f"'{key_file}' holds no readable private key for the client certificate",
                ("redis", "private_key_file" if redis.private_key_file else "certificate_file"),
            ) from None
        chain = [c.original for _, c in certs[1:]]
    if not verify:
        logger.warning(
            "Redis: TLS server certificate verification is off (tls_verify=False) for %s",
            redis.host,
        )
        options = ssl.CertificateOptions(
            privateKey=client.privateKey.original if client else None,
            certificate=client.original if client else None,
            extraCertChain=chain or None,
            verify=False,
        )
        # TLSMemoryBIOFactory accepts a context factory as well as a creator.
        return cast(IOpenSSLClientConnectionCreator, options)
    cas = _ca_certificates(redis)
    trust = ssl.trustRootFromCertificates(cas) if cas else None  # type: ignore[no-untyped-call]  # None: the system's CAs
    extra: dict[str, Any] = {"extraCertChain": chain} if chain else {}
    return ssl.optionsForClientTLS(
        redis.host,
        trustRoot=trust,
        clientCertificate=client,
        extraCertificateOptions=extra or None,
    )


def _text(value: object, errors: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors)
    return str(value)
