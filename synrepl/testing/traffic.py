"""Traffic scripts: what a cluster's writers do, and what a worker must get.

A :class:`Traffic` is a list of steps (writes, unpublished writes,
duplicated lines, POSITIONs, lost Redis connections, pauses) that
:meth:`Traffic.play` performs on a simulated homeserver of either adapter
(:class:`~synrepl.testing.homeserver.FakeHomeserver`,
:class:`~synrepl.testing.asyncio_homeserver.AsyncioHomeserver`).
It returns, per (stream, writer), the rows in the order the worker must
get them, with their tokens: whatever the faults, every row once, in order.
``synrepl.testing.strategies.traffic()`` draws scripts; a property test of a
worker plays one on virtual time (:class:`~synrepl.testing.clock.VirtualTime`,
:class:`~synrepl.testing.asyncio_clock.AsyncioVirtualTime`) and compares
what its handler got with what ``play`` returned.

The script ends with a POSITION of every pair it wrote, as a writer's next
POSITION would come: the only way a worker can learn of a row that was never
published.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

import attrs

from synrepl.streams import Row
from synrepl.testing.memory import MemoryRedis
from synrepl.testing.writers import SimulatedWriters

__all__ = (
    "Traffic",
    "Write",
    "Announce",
    "DropConnections",
    "Pause",
    "Step",
    "Expected",
)


class Clocked(Protocol):
    """Virtual time of either adapter (``VirtualTime``, ``AsyncioVirtualTime``)."""

    @property
    def redis(self) -> MemoryRedis: ...

    def sleep(self, seconds: float) -> Awaitable[None]: ...


#: (stream, writer) -> [(token, raw row), ...] in delivery order.
Expected = dict[tuple[str, str], list[tuple[int, Any]]]


@attrs.frozen
class Write:
    """Rows at one new token of ``stream``, by ``writer``.

    ``published=False``: persisted, but the lines are lost on the wire (as
    while Redis is down); the writer's next POSITION reveals them, and it
    comes before the writer's next row of the stream, as it must for any
    worker to learn of them (rows no POSITION ever covers are what
    ``synrepl audit`` finds, not what a worker can).  ``duplicated``
    publishes the batch a second time.
    """

    stream: str
    writer: str
    rows: tuple[Row, ...]
    published: bool = True
    duplicated: bool = False


@attrs.frozen
class Announce:
    """``POSITION stream writer``: the writer announces its current token."""

    stream: str
    writer: str


@attrs.frozen
class DropConnections:
    """Every Redis connection is lost (they come back after their backoff)."""


@attrs.frozen
class Pause:
    """Let ``seconds`` of (virtual) time pass."""

    seconds: float


Step = Write | Announce | DropConnections | Pause


@attrs.frozen
class Traffic:
    """A script of steps for a homeserver's writers."""

    writers: tuple[str, ...]
    steps: tuple[Step, ...]

    def pairs(self) -> list[tuple[str, str]]:
        """The (stream, writer) pairs written, in first-write order."""
        seen = {(s.stream, s.writer): None for s in self.steps if isinstance(s, Write)}
        return list(seen)

    def streams(self) -> list[str]:
        return list(dict.fromkeys(stream for stream, _ in self.pairs()))

    def writes(self) -> dict[str, list[str]]:
        """writer -> the streams it writes: a FakeHomeserver's ``writes``, so
        that it answers REPLICATE for them before the first row, as Synapse does."""
        out: dict[str, list[str]] = {}
        for stream, writer in self.pairs():
            out.setdefault(writer, []).append(stream)
        return out

    async def play(self, hs: SimulatedWriters, time: Clocked) -> Expected:
        """Perform every step on ``hs`` (its Redis being ``time.redis``), then
        the closing POSITIONs; returns what a worker connected before the
        first step must get."""
        expected: Expected = {pair: [] for pair in self.pairs()}
        unrevealed: set[tuple[str, str]] = set()
        for step in self.steps:
            if isinstance(step, Write):
                pair = (step.stream, step.writer)
                if step.published and pair in unrevealed:
                    hs.position(step.stream, writer=step.writer)
                    unrevealed.discard(pair)
                if step.published:
                    token = hs.write(step.stream, list(step.rows), writer=step.writer)
                    if step.duplicated:
                        hs.resend(step.stream, token, writer=step.writer)
                else:
                    token = hs.write_silently(step.stream, list(step.rows), writer=step.writer)
                    unrevealed.add(pair)
                expected[(step.stream, step.writer)].extend((token, r.to_raw()) for r in step.rows)
            elif isinstance(step, Announce):
                hs.position(step.stream, writer=step.writer)
                unrevealed.discard((step.stream, step.writer))
            elif isinstance(step, DropConnections):
                time.redis.drop_connections()
            else:
                await time.sleep(step.seconds)
        for stream, writer in self.pairs():
            hs.position(stream, writer=writer)
        return expected

    def describe(self) -> Sequence[str]:
        """One line per step, for a failing example's report."""
        return [repr(step) for step in self.steps]
