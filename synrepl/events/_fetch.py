"""Fetching one batch of full events: retries, giving up, and backoff, without I/O.

Rule 1: every decision about fetching a batch lives here; the adapters run
the source in a worker thread and wait where this says, nothing more.

Theory of operation
===================

:class:`EventFetch` is one batch's state machine.  The adapter loops::

    fetch = EventFetch(rows, policy)
    while not isinstance(step := fetch.next(), Done):
        if isinstance(step, Fetch):
            try:
                fetch.got(source.fetch(step.event_ids))
            except EventSourceUnavailable as e:
                fetch.failed(e)
        else:  # Wait
            sleep(step.seconds)
    deliver(step.found, step.missing)

The rules:

1. The first step fetches every event of the batch.
2. Events not found are asked for again, alone, after
   :attr:`EventFetchPolicy.missing_delay` (doubling, at most
   ``missing_max_delay``), up to ``missing_attempts`` attempts in all; then
   they are given up on as :class:`~synrepl.events.MissingEvent`.  Purged
   history is never coming back, and a replica behind the primary or a
   writer's commit not yet visible needs only a moment.
3. A source that is unavailable is retried for ever, waiting
   ``unavailable_backoff`` (exponential, with jitter) in between: the
   batch's position must not move past events that were never fetched.
   Failures do not use up the not-found attempts.
4. :class:`Done` comes once every event is found or given up on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from synrepl.connection import ReconnectBackoff
from synrepl.errors import SynreplError
from synrepl.events._errors import EventSourceUnavailable, describe_error
from synrepl.events._model import FullEvent, MissingEvent
from synrepl.streams import EventRow

__all__ = (
    "EventFetchPolicy",
    "EventFetch",
    "Fetch",
    "Wait",
    "Done",
    "FetchStep",
    "EventFetchStats",
    "EventFetchStateError",
)


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{attribute.name} must be more than 0, got {value!r}")


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a whole number of at least 1, got {value!r}")


def _default_backoff() -> ReconnectBackoff:
    return ReconnectBackoff(1.0, 60.0)


@attrs.frozen
class EventFetchPolicy:
    """How hard to look for events, and how to wait for a source that is down.

    Attributes:
        missing_attempts: fetches of an event not found before it is given
            up on as missing (the first fetch included).
        missing_delay: the wait before the second attempt; it doubles.
        missing_max_delay: the longest wait between attempts.
        unavailable_backoff: the waits between attempts while the source is
            unavailable (retried for ever).

    With the defaults, an event is given up on about 6 s after it was first
    asked for.

    Raises:
        ValueError: a value is out of range.
    """

    missing_attempts: int = attrs.field(default=6, validator=_at_least_one)
    missing_delay: float = attrs.field(default=0.2, validator=_positive)
    missing_max_delay: float = attrs.field(default=5.0, validator=_positive)
    unavailable_backoff: ReconnectBackoff = attrs.field(factory=_default_backoff)

    def __attrs_post_init__(self) -> None:
        if self.missing_max_delay < self.missing_delay:
            raise ValueError(
                f"missing_max_delay ({self.missing_max_delay!r}) must not be below "
                f"missing_delay ({self.missing_delay!r})"
            )

    def delay_after_not_found(self, attempts: int) -> float:
        """The wait after ``attempts`` fetches left events not found."""
        return min(self.missing_max_delay, self.missing_delay * 2.0 ** min(attempts - 1, 32))


@attrs.frozen
class Fetch:
    """Ask the source for these events, then call ``got`` or ``failed``."""

    event_ids: tuple[str, ...]


@attrs.frozen
class Wait:
    """Wait this long, then call ``next`` again."""

    seconds: float
    #: Why: ``"not found"`` or ``"unavailable"``.
    reason: str


@attrs.frozen
class Done:
    """The batch is over: these events were found, these were given up on."""

    #: By event ID, in the batch's order.
    found: Mapping[str, FullEvent]
    missing: tuple[MissingEvent, ...]


FetchStep = Fetch | Wait | Done


@attrs.define
class EventFetchStats:
    """Counters over many batches (share one instance); they only grow."""

    #: Batches started / finished.
    batches: int = 0
    batches_done: int = 0
    #: Calls of the source asked for.
    fetches: int = 0
    #: Events found / given up on as missing.
    found: int = 0
    missing: int = 0
    #: Fetches that left some events not found (before giving up).
    not_found_retries: int = 0
    #: Fetches that failed because the source was unavailable.
    source_failures: int = 0


class EventFetchStateError(SynreplError, RuntimeError):
    """The adapter called EventFetch out of turn (a bug in the adapter)."""


_AWAITING_NEXT: Final = "next"
_AWAITING_ANSWER: Final = "answer"
_DONE: Final = "done"


class EventFetch:
    """One batch's fetch: a pure state machine (see the module's rules).

    Args:
        events: the batch: replication rows (so that a missing event keeps
            its room and type) or bare event IDs.  Repeats are fetched once.
        policy: how to retry and wait.
        stats: counters to add to, shared across batches.
    """

    def __init__(
        self,
        events: Iterable[EventRow | str],
        policy: EventFetchPolicy | None = None,
        stats: EventFetchStats | None = None,
    ) -> None:
        self.policy = policy if policy is not None else EventFetchPolicy()
        self.stats = stats if stats is not None else EventFetchStats()
        self._rows: dict[str, EventRow | None] = {}
        for item in events:
            if isinstance(item, EventRow):
                self._rows[item.event_id] = item
            elif isinstance(item, str):
                self._rows.setdefault(item, None)
            else:
                raise TypeError(f"EventFetch takes EventRow or str, got {type(item).__name__}")
        self._found: dict[str, FullEvent] = {}
        self._pending: tuple[str, ...] = tuple(self._rows)
        self._attempts = 0  # fetches that answered
        self._failures = 0  # consecutive unavailable failures
        self._wait: Wait | None = None
        self._state: str = _AWAITING_NEXT
        self._last_failure: str | None = None
        self._done: Done | None = None
        self.stats.batches += 1

    @property
    def attempts(self) -> int:
        """Fetches of this batch that the source answered."""
        return self._attempts

    @property
    def failures(self) -> int:
        """Consecutive unavailable failures (reset by an answer)."""
        return self._failures

    @property
    def last_failure(self) -> str | None:
        """The last unavailable failure's description, for logs."""
        return self._last_failure

    def next(self) -> FetchStep:
        """What to do now.  After a Fetch, ``got`` or ``failed`` must come first."""
        if self._state == _AWAITING_ANSWER:
            raise EventFetchStateError("a Fetch is outstanding: call got() or failed() first")
        if self._done is None and not self._pending:
            self._finish(())
        if self._done is not None:
            return self._done
        if self._wait is not None:
            wait, self._wait = self._wait, None
            return wait
        self._state = _AWAITING_ANSWER
        self.stats.fetches += 1
        return Fetch(self._pending)

    def got(self, found: Mapping[str, FullEvent]) -> None:
        """The source answered the last Fetch (events not found are absent)."""
        self._expect_answer()
        self._failures = 0
        self._attempts += 1
        still: list[str] = []
        for event_id in self._pending:
            event = found.get(event_id)
            if event is None:
                still.append(event_id)
            else:
                self._found[event_id] = event
        self.stats.found += len(self._pending) - len(still)
        self._pending = tuple(still)
        if not still:
            return
        if self._attempts >= self.policy.missing_attempts:
            self._finish(still)
            return
        self.stats.not_found_retries += 1
        self._wait = Wait(self.policy.delay_after_not_found(self._attempts), "not found")

    def failed(self, error: EventSourceUnavailable) -> None:
        """The last Fetch failed because the source is unavailable: wait, retry."""
        self._expect_answer()
        self.stats.source_failures += 1
        self._last_failure = describe_error(error)
        self._wait = Wait(self.policy.unavailable_backoff.delay(self._failures), "unavailable")
        self._failures += 1

    def _expect_answer(self) -> None:
        if self._state != _AWAITING_ANSWER:
            raise EventFetchStateError("no Fetch is outstanding")
        self._state = _AWAITING_NEXT

    def _finish(self, missing: Iterable[str]) -> None:
        gone = []
        reason = f"not found in {self._attempts} attempt" + ("" if self._attempts == 1 else "s")
        for event_id in missing:
            row = self._rows[event_id]
            room = row.room_id if row is not None else None
            etype = row.type if row is not None else None
            gone.append(MissingEvent(event_id, room, etype, reason))
        found = {i: self._found[i] for i in self._rows if i in self._found}
        self._done = Done(found, tuple(gone))
        self._state = _DONE
        self.stats.missing += len(gone)
        self.stats.batches_done += 1
