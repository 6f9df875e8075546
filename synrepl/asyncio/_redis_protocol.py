"""One Redis connection on an asyncio event loop: commands, replies, pub/sub pushes."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

from synrepl._resp import (
    MESSAGE,
    ReplyError,
    RespProtocolError,
    Subscription,
    encode_command,
    make_reader,
    pubsub_push,
)

__all__ = ("ConnectionClosedError", "RedisConnection")


class ConnectionClosedError(ConnectionError):
    """The connection ended before Redis answered."""


class RedisConnection(asyncio.Protocol):
    """One Redis connection of a link.

    Replies to our own commands resolve their futures in order; pub/sub
    pushes (``message``, ``subscribe``) are taken out before that.  Values
    stay bytes, so the core decides how to decode a message.  Parsing is
    hiredis's where installed, else :class:`synrepl._resp.PythonReader`;
    either way this class runs the read loop, so that pausing stops
    delivery between two replies.

    Once SUBSCRIBE is confirmed, nothing more is handed up until
    :meth:`release` (the link finishes its set-up first, and pauses reading
    if asked to).

    Args:
        loop: the event loop it runs on.
        on_message: called with ``(channel, payload)`` of each message.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[object, object], None] | None = None,
    ) -> None:
        self._loop = loop
        self._on_message = on_message
        self._reader = make_reader(RespProtocolError, ReplyError)
        self._answers: deque[asyncio.Future[object]] = deque()
        self.transport: asyncio.Transport | None = None
        #: Resolved once the connection is gone (never fails).
        self.closed: asyncio.Future[None] = loop.create_future()
        #: Why we closed this connection ourselves (set-up error, timeout, stop).
        self.close_reason: str | None = None
        #: Why it ended (set once it has).
        self.lost_reason: BaseException | None = None
        self.paused = False
        self._held = False
        self._draining = False
        self._subscription: Subscription | None = None
        self._subscribed: asyncio.Future[None] | None = None

    # --- commands ------------------------------------------------------------

    def command(self, *args: str | bytes | int) -> asyncio.Future[object]:
        """Send one command; the future gets its reply, or fails with
        :class:`ReplyError` or :class:`ConnectionClosedError`."""
        answer: asyncio.Future[object] = self._loop.create_future()
        transport = self.transport
        if transport is None or self.lost_reason is not None or transport.is_closing():
            answer.set_exception(ConnectionClosedError("the Redis connection is closed"))
            return answer
        self._answers.append(answer)
        transport.write(encode_command(*args))
        return answer

    def subscribe(self, channels: Sequence[str]) -> asyncio.Future[None]:
        """SUBSCRIBE; the future resolves once Redis has confirmed every channel."""
        done: asyncio.Future[None] = self._loop.create_future()
        transport = self.transport
        if transport is None or self.lost_reason is not None or transport.is_closing():
            done.set_exception(ConnectionClosedError("the Redis connection is closed"))
            return done
        subscription = self._subscription = Subscription(channels)
        self._subscribed = done
        # The confirmations are pushes, not one reply: they bypass the answers.
        transport.write(subscription.command)
        return done

    def release(self) -> None:
        """Hand messages up again after the subscription was confirmed."""
        self._held = False
        self._drain()

    def pause(self) -> None:
        """Stop reading (and handing up replies already read)."""
        if not self.paused:
            self.paused = True
            if self.transport is not None:
                self.transport.pause_reading()

    def resume(self) -> None:
        """Read again; what was held back is handed up from the loop, soon."""
        if self.paused:
            self.paused = False
            if self.transport is not None:
                self.transport.resume_reading()
            self._loop.call_soon(self._drain)

    def close(self, reason: str, *, abort: bool = False) -> None:
        """Close on purpose, remembering why; nothing more is handed up."""
        if self.close_reason is None:
            self.close_reason = reason
        transport = self.transport
        if transport is None or self.lost_reason is not None:
            return
        if abort:
            transport.abort()
        else:
            transport.close()

    def abort(self) -> None:
        if self.transport is not None and self.lost_reason is None:
            self.transport.abort()

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_reason = (
            exc if exc is not None else ConnectionClosedError("Redis closed the connection")
        )
        closed = ConnectionClosedError(f"the Redis connection ended: {self.lost_reason}")
        answers, self._answers = self._answers, deque()
        for answer in answers:
            if not answer.done():
                answer.set_exception(closed)
        subscribed, self._subscribed = self._subscribed, None
        if subscribed is not None and not subscribed.done():
            subscribed.set_exception(closed)
        if not self.closed.done():
            self.closed.set_result(None)

    # --- incoming ------------------------------------------------------------------

    def _drain(self) -> None:
        if self._draining:  # re-entered from a callback
            return
        self._draining = True
        try:
            gets = self._reader.gets
            while not self.paused and not self._held and self.close_reason is None:
                try:
                    reply = gets()
                except Exception as e:  # noqa: BLE001 - any parser error ends the stream
                    self.close(f"Redis sent an unreadable reply: {e}", abort=True)
                    return
                if reply is False:
                    return
                push = pubsub_push(reply)
                if push is None:
                    self._answered(reply)
                elif push[0] == MESSAGE:
                    if self._on_message is not None:
                        self._on_message(push[1], push[2])
                else:
                    self._confirmed(push[1])
        finally:
            self._draining = False

    def _answered(self, reply: object) -> None:
        if not self._answers:
            subscribed = self._subscribed
            if isinstance(reply, ReplyError) and subscribed is not None:
                # SUBSCRIBE refused (an ACL without the channel): its only answer.
                self._subscription = self._subscribed = None
                if not subscribed.done():
                    subscribed.set_exception(reply)
                return
            self.close("Redis sent a reply to no command", abort=True)
            return
        answer = self._answers.popleft()
        if answer.done():  # its caller gave up waiting
            return
        if isinstance(reply, ReplyError):
            answer.set_exception(reply)
        else:
            answer.set_result(reply)

    def _confirmed(self, channel: object) -> None:
        subscription = self._subscription
        if subscription is not None and subscription.confirmed(channel):
            self._subscription = None
            self._held = True
            subscribed, self._subscribed = self._subscribed, None
            if subscribed is not None and not subscribed.done():
                subscribed.set_result(None)
