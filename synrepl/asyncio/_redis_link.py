"""One connection of the pair and its reconnect loop, on an asyncio event loop.

The decisions (what to send, what to count and log, how long to wait, when
a PING is due) are :mod:`synrepl.connection`'s; this module runs the task,
the timers and the socket.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from synrepl._resp import ReplyError
from synrepl.asyncio._redis_endpoint import Opener
from synrepl.asyncio._redis_protocol import ConnectionClosedError, RedisConnection
from synrepl.connection import (
    SUBSCRIBER,
    Keepalive,
    Role,
    TransportState,
    log_line,
)

__all__ = ("Link",)

logger = logging.getLogger("synrepl.redis")


class Link:
    """Connect, set up, keep alive, and after any end wait and connect again.

    One task runs the loop; :meth:`stop` ends it.

    Args:
        core: the transport's state, told of set-ups, losses, failed
            attempts and messages.
        role: which link.
        opener: opens one connection.
    """

    def __init__(self, core: TransportState, role: Role, opener: Opener) -> None:
        self._core = core
        self.role: Role = role
        self.state = core.link(role)
        self._setup = core.setup(role)
        self._options = core.options
        self._opener = opener
        self.current: RedisConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._pings = Keepalive(self._options)
        self._tick: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None

    @property
    def ready(self) -> bool:
        """The current connection is set up."""
        return self.state.ready

    def ready_connection(self) -> RedisConnection | None:
        return self.current if self.state.ready and not self._stopped else None

    # --- the loop ----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._task = loop.create_task(self._run(), name=f"synrepl Redis {self.role}")
        self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "Redis %s: the connection loop failed", self.role, exc_info=task.exception()
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopped:
            why = await self._connection(loop)
            if self._stopped:
                return
            ended = self.state.ended(loop.time(), why)
            log_line(ended.log)
            if ended.failure is None:
                self._core.link_lost(self.role)
            else:
                self._core.attempt_failed(ended.failure)
            if self._stopped:
                return
            await asyncio.sleep(ended.delay)

    async def _connection(self, loop: asyncio.AbstractEventLoop) -> str:
        """One attempt, and the connection while it lasts; returns why it ended."""
        on_message = self._core.message if self.role == SUBSCRIBER else None
        conn = RedisConnection(loop, on_message)
        self.current = conn
        logger.debug("Redis %s: connecting to %s", self.role, self.state.address)
        try:
            connecting = asyncio.timeout(self._options.connect_timeout)
            try:
                async with connecting:
                    await self._opener(lambda: conn)
            except Exception as e:  # noqa: BLE001 - any failure ends only the attempt
                if connecting.expired():
                    return self.state.connect_timed_out()
                return self._core.describe(e, redis_reply=False)
            setting_up = asyncio.timeout(self._options.connect_timeout)
            try:
                async with setting_up:
                    await self._set_up(conn)
            except ConnectionClosedError:
                return self._why(conn)
            except Exception as e:  # noqa: BLE001 - a refusal, a timeout: ends the attempt
                if setting_up.expired():
                    conn.close(self.state.setup_timed_out(), abort=True)
                else:
                    conn.close(self._core.describe(e, redis_reply=False), abort=True)
                return self._why(conn)
            if conn.lost_reason is not None:
                return self._why(conn)
            self._set_up_done(loop, conn)
            await asyncio.shield(conn.closed)
            return self._why(conn)
        finally:
            self._stop_keepalive()
            if conn.lost_reason is None:
                conn.abort()  # cancelled (stop) or failed: never leave it open
            if self.current is conn:
                self.current = None

    async def _set_up(self, conn: RedisConnection) -> None:
        for step in self._setup:
            try:
                if step.answer == "subscriptions":
                    await conn.subscribe(step.channels)
                else:
                    await conn.command(*step.args)
            except ReplyError as e:
                # A fatal refusal raises RedisTransportError: the attempt fails.
                self._core.setup_refused(step.refused(str(e)))

    def _set_up_done(self, loop: asyncio.AbstractEventLoop, conn: RedisConnection) -> None:
        setup = self.state.set_up(loop.time())
        log_line(setup.log)
        paused = self.role == SUBSCRIBER and self._core.reading_paused
        self._pings = Keepalive(self._options, paused=paused)
        self._tick = loop.call_later(self._pings.interval, self._ping, conn)
        if paused:
            conn.pause()
        self._core.link_ready()
        conn.release()

    def _why(self, conn: RedisConnection) -> str:
        if conn.close_reason is not None:
            return conn.close_reason
        reason = conn.lost_reason
        if reason is None:
            return "the connection ended"
        return self._core.describe(reason, redis_reply=isinstance(reason, ReplyError))

    # --- keepalive -------------------------------------------------------------

    def _stop_keepalive(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._cancel_ping_timer()

    def _cancel_ping_timer(self) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None

    def _ping(self, conn: RedisConnection) -> None:
        if conn is not self.current or self._loop is None:
            return
        self._tick = self._loop.call_later(self._pings.interval, self._ping, conn)
        if not self.ready or not self._pings.due():
            return
        self._arm_ping_timer(conn)
        conn.command("PING").add_done_callback(functools.partial(self._pong, conn))

    def _arm_ping_timer(self, conn: RedisConnection) -> None:
        assert self._loop is not None
        self._cancel_ping_timer()
        self._ping_timer = self._loop.call_later(self._pings.timeout, self._ping_timed_out, conn)

    def _pong(self, conn: RedisConnection, answer: asyncio.Future[object]) -> None:
        if not answer.cancelled():
            answer.exception()  # any answer, even an error reply, shows it is alive
        if conn is self.current and conn.lost_reason is None and self._pings.answered():
            self._cancel_ping_timer()

    def _ping_timed_out(self, conn: RedisConnection) -> None:
        self._ping_timer = None
        if conn is self.current:
            conn.close(self.state.keepalive_timed_out(), abort=True)

    def set_paused(self, paused: bool) -> None:
        conn = self.current
        if conn is None or not self.ready:
            return  # applied once the next connection is set up
        if paused and not conn.paused:
            conn.pause()
            if self._pings.pause():
                self._cancel_ping_timer()  # its answer cannot be read now
        elif not paused and conn.paused:
            if self._pings.resume():
                self._arm_ping_timer(conn)
            conn.resume()

    # --- stop --------------------------------------------------------------------

    async def stop(self) -> None:
        """End the loop: a set-up connection is closed cleanly (aborted after
        ``connect_timeout``), anything else is abandoned at once."""
        self._stopped = True
        conn = self.current
        if conn is not None and self.state.ready:
            conn.close("stopped")
            try:
                async with asyncio.timeout(self._options.connect_timeout):
                    await asyncio.shield(conn.closed)
            except TimeoutError:
                # A peer that never completes the close (TLS) must not hang stop().
                conn.abort()
                await asyncio.shield(conn.closed)
        task = self._task
        if task is not None:
            if not task.done():
                task.cancel()
            await asyncio.wait([task])
        if self.state.stopped():
            self._core.link_lost(self.role)
