"""One connection of the pair and its reconnect loop, on a Twisted reactor.

The decisions (what to send, what to count and log, how long to wait) are
:mod:`synrepl.connection`'s; this module runs the timers and the sockets.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, cast

import txredisapi  # type: ignore[import-untyped]
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from synrepl.connection import (
    SUBSCRIBER,
    AttemptFailure,
    Keepalive,
    LinkState,
    SetUp,
    SetupCommand,
    log_line,
)
from synrepl.twisted._redis_protocol import Clock, DelayedCall, OneShotFactory, RedisConnection

__all__ = ("Link", "LinkOwner")

logger = logging.getLogger("synrepl.redis")


class LinkOwner(Protocol):
    """What a :class:`Link` reports to: the transport, through private names
    (they are no part of its public API)."""

    @property
    def _reading_paused(self) -> bool:
        """Whether the subscriber's reading is paused (applied on each set-up)."""

    def _describe(self, reason: Failure | BaseException) -> str:
        """A password-free account of ``reason`` (see describe_failure)."""

    def _deliver(self, channel: object, data: object) -> None:
        """A pub/sub message arrived on the subscriber."""

    def _setup_refused(self, message: str) -> None:
        """Redis refused a set-up command that is not fatal: warn."""

    def _link_ready(self, link: Link, setup: SetUp) -> None:
        """``link`` is set up."""

    def _link_lost(self, link: Link) -> None:
        """A set-up connection of ``link`` ended (by ``stop()`` too)."""

    def _attempt_failed(self, failure: AttemptFailure) -> None:
        """A connection attempt failed before it was set up."""


class Link:
    """Connect, set up, keep alive, and after any end wait and connect again.

    Args:
        owner: told of set-ups, losses, failed attempts and messages.
        state: the link's policy state (role, options, counters, logging).
        clock: the reactor's IReactorTime.
        endpoint: an IStreamClientEndpoint for Redis.
        setup: the commands to send on each fresh connection.
    """

    def __init__(
        self,
        owner: LinkOwner,
        state: LinkState,
        clock: Clock,
        endpoint: Any,
        setup: tuple[SetupCommand, ...],
    ) -> None:
        self._owner = owner
        self.state = state
        self.role = state.role
        self._options = state.options
        self._clock = clock
        self._endpoint = endpoint
        self._setup = setup
        self.current: RedisConnection | None = None
        self._stopped = False
        self._connecting: defer.Deferred[object] | None = None
        self._retry: DelayedCall | None = None
        self._setup_timer: DelayedCall | None = None
        self._keepalive: LoopingCall | None = None
        self._ping_timer: DelayedCall | None = None
        self._pings = Keepalive(self._options)
        self._closed_waiters: list[defer.Deferred[None]] = []

    @property
    def ready(self) -> bool:
        """The current connection is set up."""
        return self.state.ready

    # --- the loop ----------------------------------------------------------------

    def start(self) -> None:
        self._connect()

    def _connect(self) -> None:
        self._retry = None
        if self._stopped:
            return
        proto = RedisConnection(self._clock, self._owner._deliver, self.connection_lost)
        self.current = proto
        logger.debug("Redis %s: connecting to %s", self.role, self.state.address)
        d: defer.Deferred[object] = defer.maybeDeferred(
            self._endpoint.connect, OneShotFactory(proto)
        )
        self._connecting = d
        d.addCallbacks(
            self._connected, self._connect_failed, callbackArgs=(proto,), errbackArgs=(proto,)
        )

    def _connected(self, _: object, proto: RedisConnection) -> None:
        self._connecting = None
        if proto is not self.current or proto.lost_reason is not None:
            return
        self._setup_timer = self._clock.callLater(
            self._options.connect_timeout, self._setup_timed_out, proto
        )
        d = defer.ensureDeferred(self._set_up(proto))
        d.addCallbacks(
            self._set_up_done, self._set_up_failed, callbackArgs=(proto,), errbackArgs=(proto,)
        )

    async def _set_up(self, proto: RedisConnection) -> None:
        for step in self._setup:
            try:
                if step.answer == "subscriptions":
                    await proto.subscribe(step.channels)
                else:
                    await proto.command(*step.args)
            except txredisapi.ResponseError as e:
                # A fatal refusal raises RedisTransportError: the attempt fails.
                self._owner._setup_refused(step.refused(str(e)))

    def _set_up_done(self, _: object, proto: RedisConnection) -> None:
        self._cancel_setup_timer()
        if proto is not self.current or proto.close_reason is not None:
            return
        setup = self.state.set_up(self._clock.seconds())
        log_line(setup.log)
        paused = self.role == SUBSCRIBER and self._owner._reading_paused
        self._start_keepalive(paused)
        if paused:
            proto.pauseProducing()
        self._owner._link_ready(self, setup)

    def _set_up_failed(self, failure: Failure, proto: RedisConnection) -> None:
        self._cancel_setup_timer()
        if proto.lost_reason is None:
            # Still open, so the failure is Redis's answer (AUTH, SELECT, ...):
            # close, and connection_lost retries.
            proto.close(self._owner._describe(failure), abort=True)
        # Otherwise the connection is gone and connection_lost handles it.

    def _setup_timed_out(self, proto: RedisConnection) -> None:
        self._setup_timer = None
        proto.close(self.state.setup_timed_out(), abort=True)

    def _cancel_setup_timer(self) -> None:
        if self._setup_timer is not None and self._setup_timer.active():
            self._setup_timer.cancel()
        self._setup_timer = None

    def _connect_failed(self, failure: Failure, proto: RedisConnection) -> None:
        self._connecting = None
        if proto is self.current:
            self.current = None
        if self._stopped:
            return
        self._ended(self._owner._describe(failure))

    def connection_lost(self, proto: RedisConnection, reason: Failure) -> None:
        if proto is not self.current:
            return
        self.current = None
        self._cancel_setup_timer()
        self._stop_keepalive()
        if self._stopped:
            if self.state.stopped():
                self._owner._link_lost(self)
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)
            return
        self._ended(proto.close_reason or self._owner._describe(reason))

    def _ended(self, why: str) -> None:
        ended = self.state.ended(self._clock.seconds(), why)
        log_line(ended.log)
        if ended.failure is None:
            self._owner._link_lost(self)
        else:
            self._owner._attempt_failed(ended.failure)
        if not self._stopped:
            self._retry = self._clock.callLater(ended.delay, self._connect)

    # --- keepalive -------------------------------------------------------------

    def _start_keepalive(self, paused: bool) -> None:
        self._stop_keepalive()
        self._pings = Keepalive(self._options, paused=paused)
        loop = LoopingCall(self._ping)
        loop.clock = cast(Any, self._clock)
        self._keepalive = loop
        loop.start(self._pings.interval, now=False).addErrback(
            lambda f: logger.error("Redis %s: keepalive failed: %s", self.role, f.value)
        )

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        self._cancel_ping_timer()

    def _cancel_ping_timer(self) -> None:
        if self._ping_timer is not None and self._ping_timer.active():
            self._ping_timer.cancel()
        self._ping_timer = None

    def _ping(self) -> None:
        proto = self.current
        if proto is None or not self.ready or not self._pings.due():
            return
        self._arm_ping_timer(proto)
        proto.command("PING").addBoth(self._pong, proto)

    def _arm_ping_timer(self, proto: RedisConnection) -> None:
        self._cancel_ping_timer()
        self._ping_timer = self._clock.callLater(self._pings.timeout, self._ping_timed_out, proto)

    def _pong(self, _: object, proto: RedisConnection) -> None:
        # Any answer, even an error reply, shows the connection is alive; a
        # lost connection is handled by connection_lost.
        if proto is self.current and self._pings.answered():
            self._cancel_ping_timer()

    def _ping_timed_out(self, proto: RedisConnection) -> None:
        self._ping_timer = None
        if proto is not self.current:
            return
        proto.close(self.state.keepalive_timed_out(), abort=True)

    def set_paused(self, paused: bool) -> None:
        proto = self.current
        if proto is None or not self.ready:
            return  # applied once the next connection is set up
        if paused and not proto.paused:
            proto.pauseProducing()
            if self._pings.pause():
                self._cancel_ping_timer()  # its answer cannot be read now
        elif not paused and proto.paused:
            # Before reading: a line read now may pause again at once.
            if self._pings.resume():
                self._arm_ping_timer(proto)
            proto.resumeProducing()

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
        force = self._clock.callLater(self._options.connect_timeout, proto.abort)

        def _cancel_force(result: None) -> None:
            if force.active():
                force.cancel()
            return result

        d.addBoth(_cancel_force)
        return d

    def ready_connection(self) -> RedisConnection | None:
        return self.current if self.ready and not self._stopped else None
