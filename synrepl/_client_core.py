"""The reactor-free half of every ReplicationClient.

An adapter (``synrepl.twisted.client``, later ``synrepl.asyncio``) owns the
sockets and the event loop; this class owns everything else a client does:
it types lines, routes them to :class:`~synrepl.delivery.Delivery` or to
command handlers, calls row handlers (directly when they return nothing,
through the adapter when they return an awaitable), carries the core's
actions out through a few hooks, keeps counters and says what went wrong
in the log.  No protocol or delivery rule is decided in an adapter.

The adapter implements four hooks: :meth:`_start_fetch` (ask a writer for a
page, then call :meth:`_fetch_done` or :meth:`_fetch_failed`),
:meth:`_await_then` (wait for what a handler returned),
:meth:`_waiter_reached` and :meth:`_send`.  It feeds the transport's events
in through :meth:`_line_received`, :meth:`_subscribed` and
:meth:`_connection_lost`.

Actions are carried out by one loop (:meth:`_perform`): a handler that
completes synchronously queues the next batch instead of calling into it,
so thousands of queued batches cost no stack.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import attrs

from synrepl._ratelimit import RateLimitedWarning, SecondsClock
from synrepl.commands import (
    CancelTaskCommand,
    ClearUserSyncCommand,
    Command,
    FederationAckCommand,
    LockReleasedCommand,
    NewActiveTaskCommand,
    PositionCommand,
    RdataCommand,
    RemoteServerUpCommand,
    SelectiveParser,
    UserIpCommand,
    UserSyncCommand,
)
from synrepl.config import SynapseConfig
from synrepl.delivery import Action, Delivery, PositionReached
from synrepl.errors import MalformedRowError, ProtocolError, SynreplError, UnknownCommandError
from synrepl.positions import (
    Counters,
    FetchNeeded,
    GapUnfillable,
    RowsReceived,
    StreamReset,
    UnnamedWriter,
    WriterBehind,
)
from synrepl.sharding import MAIN_INSTANCE_NAME, canonical_instance_name
from synrepl.streams import STREAM_NAMES, AnyRow, parse_row

__all__ = (
    "ClientCore",
    "ClientCounters",
    "ReadOnlyError",
    "RowHandler",
    "GapHandler",
    "ResetHandler",
    "StreamUpdatesLike",
    "named_instances",
)

logger = logging.getLogger("synrepl.client")

_C = TypeVar("_C", bound=Command)
#: What the adapter's ``send_*`` methods return (a Deferred, an awaitable).
_Sent = TypeVar("_Sent")

#: What a row handler gets: one token's rows of one writer.  It returns
#: None when done, or an awaitable (coroutine, Deferred, future) to wait for.
RowHandler = Callable[[RowsReceived], object]
GapHandler = Callable[[GapUnfillable], object]
ResetHandler = Callable[[StreamReset | WriterBehind], object]

#: Longest exception text put in a log line or a gap's reason.
_REASON_LIMIT = 300


class ReadOnlyError(SynreplError, RuntimeError):
    """The client was asked to publish while in read-only mode."""


class StreamUpdatesLike(Protocol):
    """One page of ``get_repl_stream_updates``."""

    @property
    def updates(self) -> list[tuple[int, Any]]: ...

    @property
    def upto_token(self) -> int: ...

    @property
    def limited(self) -> bool: ...


@attrs.frozen
class ClientCounters:
    """A snapshot of a client's running totals (they only ever grow)."""

    #: Lines received from Redis.
    lines: int
    #: Lines (and fetched rows) that did not parse, skipped.
    bad_lines: int
    #: Lines naming a command synrepl does not know, skipped.
    unknown_commands: int
    #: Rows and batches the handlers finished with.
    rows_delivered: int
    batches_delivered: int
    #: Rows that came over HTTP, and pages fetched.
    rows_fetched: int
    fetch_pages: int
    #: Fetches that failed (each became a reported gap).
    fetch_failures: int
    #: Times a stream's queue was full and live rows were refetched later.
    overflows: int
    #: Gaps reported as lost (GapUnfillable).
    gaps: int
    #: Resettable streams whose writer restarted.
    resets: int
    #: Writers found behind our position on a monotonic stream.
    writers_behind: int
    #: Commands from writers the configuration does not name.
    unnamed_writer_commands: int
    #: Handler calls that raised or failed.
    handler_errors: int
    #: Redis subscriptions after the first.
    reconnects: int
    #: The position bookkeeping's own counters.
    wire: Counters


@attrs.define
class _Totals:
    lines: int = 0
    bad_lines: int = 0
    unknown_commands: int = 0
    rows_delivered: int = 0
    batches_delivered: int = 0
    rows_fetched: int = 0
    fetch_pages: int = 0
    fetch_failures: int = 0
    gaps: int = 0
    handler_errors: int = 0
    reconnects: int = 0


def named_instances(config: SynapseConfig) -> frozenset[str]:
    """Every instance the configuration names: rows can be fetched from these."""
    names = {MAIN_INSTANCE_NAME, config.instance_name}
    names.update(canonical_instance_name(name) for name in config.instance_map)
    names.update(config.stream_writers.all_writers())
    names.update(config.stream_writers.federation_senders)
    return frozenset(names)


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= _REASON_LIMIT else text[:_REASON_LIMIT] + "..."


def _sent_by(cmd: Command) -> str | None:
    """The instance a command names as its sender, where it names one."""
    if isinstance(cmd, (UserSyncCommand, ClearUserSyncCommand)):
        return cmd.instance_id
    if isinstance(cmd, (FederationAckCommand, LockReleasedCommand)):
        return cmd.instance_name
    return None


class ClientCore(Generic[_Sent]):
    """The shared body of the ReplicationClient adapters (see the module docs).

    Args:
        config: the cluster's configuration.
        clock: tells the time, for rate-limited warnings.
        instance_name: this process's name on the wire (default: the
            config's ``worker_name``, else ``synrepl-<random>``).
        streams: the streams to follow (None: all).
        start: processed positions to resume from.
        read_only: publish nothing at all, not even REPLICATE.
        passive: do not send REPLICATE.
        max_pending_rows: the per-stream memory bound.
        trust_writer: on a writer behind our position, take its position.
    """

    def __init__(
        self,
        config: SynapseConfig,
        clock: SecondsClock,
        *,
        instance_name: str | None,
        streams: Collection[str] | None,
        start: Mapping[str, Mapping[str, int]] | None,
        read_only: bool,
        passive: bool,
        max_pending_rows: int,
        trust_writer: bool,
    ) -> None:
        if max_pending_rows < 1:
            raise ValueError("max_pending_rows must be at least 1")
        self._config = config
        self.instance_name = (
            instance_name or config.worker_name or f"synrepl-{secrets.token_hex(4)}"
        )
        self._read_only = read_only
        self._passive = passive
        self._streams = None if streams is None else frozenset(streams)
        writers = {
            stream: config.stream_writers.writers_for_stream(stream)
            for stream in (STREAM_NAMES if self._streams is None else self._streams)
        }
        self._delivery = Delivery(
            local_instance=self.instance_name,
            streams=self._streams,
            start=start,
            writers=writers,
            fetchable=named_instances(config),
            trust_writer=trust_writer,
            max_pending_rows=max_pending_rows,
        )
        self._parse = SelectiveParser(streams=self._streams)
        self._row_handlers: dict[str | None, list[RowHandler]] = {}
        self._gap_handlers: list[GapHandler] = []
        self._reset_handlers: list[ResetHandler] = []
        self._command_handlers: dict[type[Command], list[Callable[[Any], object]]] = {}
        self._syncing_users: set[tuple[str, str | None]] = set()
        self._totals = _Totals()
        self._subscriptions = 0
        self._todo: deque[Action] = deque()
        self._performing = False
        self._bad_lines = RateLimitedWarning(logger, clock)
        self._handler_errors = RateLimitedWarning(logger, clock)

    # ------------------------------------------------------------ handlers

    def on_rows(self, stream: str | None, handler: RowHandler) -> None:
        """Call ``handler`` with each token's rows of ``stream`` (None: every stream).

        Per stream, the next batch waits until what the handler returns (a
        coroutine, Deferred or other awaitable) has finished; streams do not
        wait for each other.  A handler that returns None is called directly.
        A handler that raises is logged and counted, and delivery goes on.
        """
        self._row_handlers.setdefault(stream, []).append(handler)

    def on_gap(self, handler: GapHandler) -> None:
        """Call ``handler`` when rows are known to be missing and cannot be
        fetched; it gets the exact range (``from_token < token <= upto_token``),
        in order with the stream's rows."""
        self._gap_handlers.append(handler)

    def on_reset(self, handler: ResetHandler) -> None:
        """Call ``handler`` when a writer's position went back: a
        :class:`~synrepl.positions.StreamReset` (a resettable stream's writer
        restarted) or a :class:`~synrepl.positions.WriterBehind` (our position
        was ahead of the writer's on a stream that never goes back).  State
        derived from that stream may be wrong."""
        self._reset_handlers.append(handler)

    def on_command(self, command_type: type[_C], handler: Callable[[_C], object]) -> None:
        """Call ``handler`` for every received command of ``command_type``
        (REMOTE_SERVER_UP, LOCK_RELEASED, USER_SYNC, ...).  Commands this
        instance sent itself are not passed back."""
        self._command_handlers.setdefault(command_type, []).append(handler)

    # ------------------------------------------------------------ positions

    def positions(self) -> dict[str, dict[str, int]]:
        """What the handlers have fully processed, per stream and writer.

        Save it and pass it back as ``start`` to resume without loss."""
        return self._delivery.positions()

    def persisted_upto(self, stream: str) -> int | None:
        """The lowest processed token over the stream's writers: every row
        below it has been handled, whoever wrote it.

        The writers are those the config names for the stream (for streams it
        does not fix, such as ``caches``, those heard from); None until each
        of them has been heard from.
        """
        return self._delivery.persisted_upto(stream)

    def pending_rows(self, stream: str) -> int:
        """Rows of ``stream`` queued for the handlers (at most the bound plus a page)."""
        return self._delivery.pending_rows(stream)

    @property
    def counters(self) -> ClientCounters:
        """A typed snapshot of the running totals."""
        t = self._totals
        wire = attrs.evolve(self._delivery.wire.counters)
        return ClientCounters(
            lines=t.lines,
            bad_lines=t.bad_lines,
            unknown_commands=t.unknown_commands,
            rows_delivered=t.rows_delivered,
            batches_delivered=t.batches_delivered,
            rows_fetched=t.rows_fetched,
            fetch_pages=t.fetch_pages,
            fetch_failures=t.fetch_failures,
            overflows=wire.overflows,
            gaps=t.gaps,
            resets=wire.resets,
            writers_behind=wire.writers_behind,
            unnamed_writer_commands=wire.unnamed_writer_commands,
            handler_errors=t.handler_errors,
            reconnects=t.reconnects,
            wire=wire,
        )

    def _check_followed(self, stream: str) -> None:
        if self._streams is not None and stream not in self._streams:
            raise ValueError(f"stream {stream!r} is not followed by this client")

    # ------------------------------------------------------------ sending

    def send_user_sync(
        self, user_id: str, device_id: str | None, is_syncing: bool, last_sync_ms: int
    ) -> _Sent:
        """Announce that a user started (or stopped) syncing on this instance."""
        sent = self._checked_send(
            UserSyncCommand(self.instance_name, user_id, device_id, is_syncing, last_sync_ms)
        )
        if is_syncing:
            self._syncing_users.add((user_id, device_id))
        else:
            self._syncing_users.discard((user_id, device_id))
        return sent

    def send_clear_user_sync(self) -> _Sent:
        """Forget every user sync this instance announced."""
        sent = self._checked_send(ClearUserSyncCommand(self.instance_name))
        self._syncing_users.clear()
        return sent

    def send_federation_ack(self, token: int) -> _Sent:
        """Acknowledge the federation stream up to ``token``."""
        return self._checked_send(FederationAckCommand(self.instance_name, token))

    def send_user_ip(
        self,
        user_id: str,
        access_token: str,
        ip: str,
        user_agent: str,
        device_id: str | None,
        last_seen: int,
    ) -> _Sent:
        """Report client activity (published on ``<server_name>/USER_IP``)."""
        return self._checked_send(
            UserIpCommand(user_id, access_token, ip, user_agent, device_id, last_seen)
        )

    def send_remote_server_up(self, server_name: str) -> _Sent:
        """Tell the cluster a remote server answers again."""
        return self._checked_send(RemoteServerUpCommand(server_name))

    def send_lock_released(self, lock_name: str, lock_key: str) -> _Sent:
        """Tell waiters that this instance released a lock."""
        return self._checked_send(LockReleasedCommand(self.instance_name, lock_name, lock_key))

    def send_new_active_task(self, task_id: str) -> _Sent:
        """Wake the task scheduler for ``task_id``."""
        return self._checked_send(NewActiveTaskCommand(task_id))

    def send_cancel_task(self, task_id: str) -> _Sent:
        """Ask the task scheduler to cancel ``task_id``."""
        return self._checked_send(CancelTaskCommand(task_id))

    def _checked_send(self, cmd: Command) -> _Sent:
        if self._read_only:
            raise ReadOnlyError(f"read-only replication client: not sending {cmd.NAME}")
        return self._send(cmd)

    def _clear_on_stop(self) -> Command | None:
        """The command to send before leaving: CLEAR_USER_SYNC if syncs were announced."""
        if self._syncing_users and not self._read_only:
            return ClearUserSyncCommand(self.instance_name)
        return None

    # ------------------------------------------------------------ hooks (the adapter's)

    def _send(self, cmd: Command) -> _Sent:
        """Publish ``cmd`` as this instance."""
        raise NotImplementedError

    def _start_fetch(self, need: FetchNeeded) -> None:
        """Ask ``need.writer`` for the page; report it with :meth:`_fetch_done`
        or :meth:`_fetch_failed`."""
        raise NotImplementedError

    def _await_then(self, result: object, then: Callable[[BaseException | None], None]) -> None:
        """Wait for ``result`` (what a handler returned), then call ``then``
        with None or the exception it failed with."""
        raise NotImplementedError

    def _waiter_reached(self, key: object) -> None:
        """The waiter registered under ``key`` is satisfied."""
        raise NotImplementedError

    # ------------------------------------------------------------ the transport's events

    def _line_received(self, channel: str, line: str) -> None:
        self._totals.lines += 1
        try:
            cmd = self._parse(line)
        except UnknownCommandError as e:
            self._totals.unknown_commands += 1
            self._bad_lines.warning("skipping unknown replication command %r", e.name)
            return
        except ProtocolError as e:
            self._totals.bad_lines += 1
            self._bad_lines.warning("skipping bad replication line: %s", e)
            return
        if cmd is None:
            return
        if isinstance(cmd, (RdataCommand, PositionCommand)):
            self._perform(self._delivery.receive(cmd))
            return
        if _sent_by(cmd) == self.instance_name:
            return  # our own echo
        self._call_all(self._command_handlers.get(type(cmd), ()), cmd)

    def _subscribed(self) -> bool:
        """The subscription is (re)confirmed; True if REPLICATE should be sent now."""
        self._subscriptions += 1
        if self._subscriptions > 1:
            self._totals.reconnects += 1
        return not (self._read_only or self._passive)

    def _connection_lost(self) -> None:
        self._perform(self._delivery.connection_lost())

    # ------------------------------------------------------------ fetch results

    def _fetch_done(self, need: FetchNeeded, page: StreamUpdatesLike) -> None:
        updates = self._typed(need.stream, page.updates)
        self._totals.fetch_pages += 1
        self._totals.rows_fetched += len(updates)
        self._perform(
            self._delivery.fetched(need.stream, need.writer, updates, page.upto_token, page.limited)
        )

    def _fetch_failed(self, need: FetchNeeded, error: BaseException) -> None:
        reason = _describe(error)
        self._totals.fetch_failures += 1
        logger.warning(
            "cannot fetch %s rows from %s (%d, %d]: %s",
            need.stream,
            need.writer,
            need.from_token,
            need.upto_token,
            reason,
        )
        self._perform(self._delivery.fetch_failed(need.stream, need.writer, reason))

    def _typed(self, stream: str, updates: Sequence[tuple[int, Any]]) -> list[tuple[int, AnyRow]]:
        typed: list[tuple[int, AnyRow]] = []
        for token, raw in updates:
            try:
                typed.append((int(token), parse_row(stream, raw)))
            except (MalformedRowError, TypeError, ValueError) as e:
                self._totals.bad_lines += 1
                self._bad_lines.warning("skipping bad fetched %s row: %s", stream, e)
        return typed

    # ------------------------------------------------------------ carrying actions out

    def _perform(self, actions: list[Action]) -> None:
        """Carry out actions, and those they lead to, in one loop (never recursing)."""
        self._todo.extend(actions)
        if self._performing:
            return
        self._performing = True
        try:
            todo = self._todo
            while todo:
                action = todo.popleft()
                if isinstance(action, RowsReceived):
                    self._run_handlers(action, 0)
                elif isinstance(action, FetchNeeded):
                    self._start_fetch(action)
                elif isinstance(action, PositionReached):
                    self._waiter_reached(action.key)
                elif isinstance(action, GapUnfillable):
                    self._report_gap(action)
                elif isinstance(action, (StreamReset, WriterBehind)):
                    self._report_reset(action)
                else:
                    self._report_unnamed(action)
        finally:
            self._performing = False

    def _handlers_for(self, stream: str) -> list[RowHandler]:
        specific = self._row_handlers.get(stream)
        general = self._row_handlers.get(None)
        if specific and general:
            return specific + general
        return specific or general or []

    def _run_handlers(self, batch: RowsReceived, index: int) -> None:
        """Call the handlers from ``index`` on; the batch is done after the last."""
        handlers = self._handlers_for(batch.stream)
        while index < len(handlers):
            handler = handlers[index]
            index += 1
            try:
                result = handler(batch)
            except Exception as e:  # noqa: BLE001 - a user's handler may raise anything
                self._handler_failed(e)
                continue
            if result is not None:
                self._await_then(result, partial(self._handler_returned, batch, index))
                return
        if handlers:
            self._totals.rows_delivered += len(batch.rows)
            self._totals.batches_delivered += 1
        self._perform(self._delivery.handled(batch))

    def _handler_returned(
        self, batch: RowsReceived, index: int, error: BaseException | None
    ) -> None:
        if error is not None:
            self._handler_failed(error)
        self._run_handlers(batch, index)

    def _handler_failed(self, error: BaseException) -> None:
        self._totals.handler_errors += 1
        self._handler_errors.warning(
            "replication handler failed: %s", _describe(error), exc_info=error
        )

    def _report_gap(self, gap: GapUnfillable) -> None:
        self._totals.gaps += 1
        logger.error(
            "rows lost: %s from %s in (%d, %d]: %s",
            gap.stream,
            gap.writer,
            gap.from_token,
            gap.upto_token,
            gap.reason,
        )
        self._call_all(self._gap_handlers, gap)

    def _report_reset(self, event: StreamReset | WriterBehind) -> None:
        if isinstance(event, WriterBehind):
            logger.error(
                "%s from %s: the writer is at %d, behind our position %d, on a stream that "
                "never goes back (a checkpoint kept across a database restore?); %s",
                event.stream,
                event.writer,
                event.new_token,
                event.old_token,
                f"trusting the writer: its rows after {event.new_token} will be delivered"
                if event.trusted
                else f"keeping our position: its rows up to {event.old_token} will be dropped",
            )
        else:
            logger.info(
                "%s from %s restarted: token %d -> %d",
                event.stream,
                event.writer,
                event.old_token,
                event.new_token,
            )
        self._call_all(self._reset_handlers, event)

    def _report_unnamed(self, event: UnnamedWriter) -> None:
        logger.warning(
            "%s rows from %s, an instance the configuration does not name: they are "
            "delivered, but gaps cannot be filled from it (add it to instance_map)",
            event.stream,
            event.writer,
        )

    def _call_all(self, handlers: Sequence[Callable[[Any], object]], event: object) -> None:
        """Call each handler; failures are counted and logged, never raised."""
        for handler in handlers:
            try:
                result = handler(event)
            except Exception as e:  # noqa: BLE001 - a user's handler may raise anything
                self._handler_failed(e)
                continue
            if result is not None:
                self._await_then(result, self._handler_done)

    def _handler_done(self, error: BaseException | None) -> None:
        if error is not None:
            self._handler_failed(error)
