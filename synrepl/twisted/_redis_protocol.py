"""One Redis connection: txredisapi's protocol, with pub/sub pushes taken out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol, cast

import txredisapi  # type: ignore[import-untyped]
from twisted.internet import defer
from twisted.internet.protocol import ClientFactory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure

from synrepl._resp import MESSAGE, Subscription, pubsub_push
from synrepl.twisted._resp import PythonReader

__all__ = ("HIREDIS", "Clock", "DelayedCall", "RedisConnection", "OneShotFactory")

#: True when txredisapi parses replies with hiredis (the C parser).
HIREDIS: Final[bool] = txredisapi.hiredis is not None and issubclass(
    txredisapi.RedisProtocol, txredisapi.HiredisProtocol
)


class DelayedCall(Protocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class Clock(Protocol):
    """The part of IReactorTime used here (zope interfaces do not type-check)."""

    def seconds(self) -> float: ...
    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> DelayedCall: ...


class RedisConnection(txredisapi.RedisProtocol):  # type: ignore[misc]
    """One Redis connection of a link.

    Replies to our own commands go to txredisapi's reply queue as usual;
    pub/sub pushes (``message``, ``subscribe``) are taken out before that.
    Values stay bytes (no charset, no number conversion), so the core
    decides how to decode a message.  Parsing is hiredis's reader where
    installed, else :class:`PythonReader`; either way this class runs the
    read loop, so that pausing stops delivery between two replies.

    Args:
        clock: schedules txredisapi's own timers (not the global reactor).
        on_message: called with ``(channel, payload)`` of each message.
        on_lost: called with this connection and the reason once it is gone.
    """

    def __init__(
        self,
        clock: Clock,
        on_message: Callable[[object, object], None],
        on_lost: Callable[[RedisConnection, Failure], None],
    ) -> None:
        super().__init__(
            charset=None, replyTimeout=None, password=None, dbid=None, convertNumbers=False
        )
        # txredisapi's pure-Python parser schedules through a class attribute
        # bound to the global reactor; use ours.
        self.callLater = clock.callLater
        if not HIREDIS:
            self._reader = PythonReader()
        self._on_message = on_message
        self._on_lost = on_lost
        #: Why we closed this connection ourselves (setup error, timeout, stop).
        self.close_reason: str | None = None
        self.lost_reason: Failure | None = None
        self._draining = False
        self._subscription: Subscription | None = None
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
        subscription = self._subscription = Subscription(channels)
        d: defer.Deferred[None] = defer.Deferred()
        self._subscribing = d
        # The confirmations are pushes, not one reply: they bypass the queue.
        self.transport.write(subscription.command)
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
        push = pubsub_push(reply)
        if push is None:
            pending = self._subscribing
            if (
                pending is not None
                and isinstance(reply, txredisapi.ResponseError)
                and not self.replyQueue.waiting
            ):
                # SUBSCRIBE refused (an ACL without the channel): its only answer.
                self._subscription = self._subscribing = None
                pending.errback(reply)
                return
            self.replyQueue.put(reply)
        elif push[0] == MESSAGE:
            if self.close_reason is None:
                self._on_message(push[1], push[2])
        else:
            self._confirmed(push[1])

    def _confirmed(self, channel: object) -> None:
        subscription = self._subscription
        if subscription is not None and subscription.confirmed(channel):
            self._subscription = None
            d, self._subscribing = self._subscribing, None
            if d is not None:
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
        self._on_lost(self, reason)


class OneShotFactory(ClientFactory):
    """Hands an endpoint the protocol instance already made for this attempt."""

    def __init__(self, protocol: RedisConnection) -> None:
        self._protocol: RedisConnection | None = protocol

    def buildProtocol(self, addr: object) -> TwistedProtocol | None:
        # Once only: a second connection (a racing address) is refused.
        protocol, self._protocol = self._protocol, None
        return cast("TwistedProtocol | None", protocol)
