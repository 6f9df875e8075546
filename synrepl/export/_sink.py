"""The sink contract: what the exporter asks of a sink, and what it promises.

A sink is anything with three coroutines (asyncio, as their client
libraries are):

- ``open()``: connect.  Raise :class:`SinkUnavailable` when the server is
  not there; the exporter waits and calls ``open()`` again.
- ``send(messages)``: store the messages, in the order given, and return only
  once the server has *acknowledged* all of them (durably, as far as the
  server can say so).  The exporter checkpoints after ``send`` returns, and
  never before: a crash in between sends the same messages again, with the
  same ids.  Raise :class:`SinkUnavailable` when the server is down or did not
  answer (the exporter retries the same messages, for ever, with backoff), or
  :class:`SinkRejected` when the server refused these messages for good (the
  client's failure policy then retries, and dead-letters or stops).
- ``close()``: let go of the connection; ``open()`` may follow.

Ordering: ``send`` is never called again before the previous call returned,
so a sink that stores each call's messages in order keeps per-writer order.
Idempotency: every message has an ``id`` that is the same on every resend;
a sink whose server can de-duplicate on a key (NATS JetStream's
``Nats-Msg-Id``, an HTTP receiver that honours ``Idempotency-Key``) should
give it the id, and the export is then exactly once.  Where the server
cannot (Redis Streams; Kafka, whose idempotent producer only drops its own
retries within one session), the export is at-least-once and consumers
drop duplicates by id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from synrepl.errors import SynreplError
from synrepl.export._messages import ExportMessage

__all__ = ("Sink", "SinkUnavailable", "SinkRejected")


class SinkUnavailable(SynreplError, ConnectionError):
    """The sink's server is down, unreachable or did not acknowledge in time:
    the same messages are sent again later."""


class SinkRejected(SynreplError, ValueError):
    """The sink's server refused these messages and will refuse them again
    (a webhook answering 400, a message above the server's size limit)."""


class Sink(Protocol):
    """Where exported messages go (see the module docs for the contract)."""

    @property
    def target(self) -> str:
        """Where the sink sends, for logs and metrics (never a secret)."""
        ...

    async def open(self) -> None:
        """Connect (raise :class:`SinkUnavailable` if the server is not there)."""
        ...

    async def send(self, messages: Sequence[ExportMessage]) -> None:
        """Store ``messages`` in order; return once the server acknowledged all."""
        ...

    async def close(self) -> None:
        """Let go of the connection."""
        ...
