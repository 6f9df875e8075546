"""The NATS JetStream sink: exactly once into the stream.

Each message is published to one subject with the ``Nats-Msg-Id`` header set
to its stable id, and the exporter waits for JetStream's acknowledgement of
each before the next (so the stream keeps per-writer order).  A message sent
again within the stream's ``duplicate_window`` (after a crash between the
acknowledgement and the checkpoint, or a reconnect) is acknowledged as a
duplicate and not stored again: exactly once into the stream, as long as
the exporter comes back within the window.

When no stream covers the subject the sink creates one (file storage, the
given ``duplicate_window``); an operator who wants other limits creates it
first.  Needs the ``nats`` extra (nats-py).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

from synrepl.errors import excerpt
from synrepl.export._messages import ExportMessage
from synrepl.export._sink import SinkRejected, SinkUnavailable

__all__ = ("JetStreamSink", "DEFAULT_DUPLICATE_WINDOW")

#: The de-duplication window of a stream the sink creates, in seconds (one day):
#: an exporter down for longer than this may store a message twice.
DEFAULT_DUPLICATE_WINDOW = 86_400.0


def _stream_name(subject: str) -> str:
    """A JetStream stream name for ``subject`` (names allow no ``.``, ``*``, ``>``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", subject)


class JetStreamSink:
    """Publish each message to ``subject`` with ``Nats-Msg-Id``, one ack at a time.

    Args:
        servers: the NATS server URL(s), ``nats://host:port``.
        subject: the subject messages are published to.
        stream: the stream to create when none covers ``subject`` (default:
            the subject with ``.`` as ``_``).
        duplicate_window: the created stream's de-duplication window, seconds.
        timeout: seconds to wait for a connection or an acknowledgement.
    """

    def __init__(
        self,
        servers: str,
        subject: str,
        *,
        stream: str | None = None,
        duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
        timeout: float = 10.0,
    ) -> None:
        if not subject or any(c in subject for c in " *>"):
            raise ValueError(
                f"a NATS subject to publish to has no spaces or wildcards: {subject!r}"
            )
        self.servers = servers
        self.subject = subject
        self.stream = stream or _stream_name(subject)
        self.duplicate_window = duplicate_window
        self.timeout = timeout
        #: Messages JetStream acknowledged as duplicates (stored before).
        self.duplicates = 0
        self._nc: Any = None
        self._js: Any = None

    @property
    def target(self) -> str:
        """``nats://host:port/subject``."""
        return f"{self.servers.rstrip('/')}/{self.subject}"

    async def open(self) -> None:
        """Connect, and make sure a stream covers the subject."""
        import nats
        import nats.errors
        import nats.js.errors

        if self._nc is None or self._nc.is_closed:
            try:
                self._nc = await nats.connect(
                    self.servers,
                    connect_timeout=self.timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                )
            except (nats.errors.Error, OSError, TimeoutError) as e:
                self._nc = None
                raise SinkUnavailable(
                    f"{self.target}: {excerpt(str(e) or type(e).__name__)}"
                ) from None
            self._js = self._nc.jetstream(timeout=self.timeout)
        try:
            try:
                await self._js.find_stream_name_by_subject(self.subject)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(
                    name=self.stream,
                    subjects=[self.subject],
                    duplicate_window=self.duplicate_window,
                )
        except nats.errors.NoRespondersError:
            raise SinkUnavailable(
                f"{self.target}: no JetStream here (is nats-server running with -js?)"
            ) from None
        except (nats.errors.Error, OSError, TimeoutError) as e:
            raise SinkUnavailable(f"{self.target}: {excerpt(str(e) or type(e).__name__)}") from None
        except nats.js.errors.APIError as e:
            raise SinkRejected(f"{self.target}: cannot create stream {self.stream}: {e}") from None

    async def send(self, messages: Sequence[ExportMessage]) -> None:
        """Publish in order, each acknowledged before the next."""
        import nats.errors
        import nats.js.errors

        if self._js is None:
            await self.open()
        for message in messages:
            try:
                ack = await self._js.publish(
                    self.subject, message.data, headers={"Nats-Msg-Id": message.id}
                )
            except nats.errors.MaxPayloadError as e:
                raise SinkRejected(f"{self.target}: {message.id}: {e}") from None
            except (nats.errors.Error, OSError, TimeoutError) as e:
                raise SinkUnavailable(
                    f"{self.target}: {excerpt(str(e) or type(e).__name__)}"
                ) from None
            except nats.js.errors.ServiceUnavailableError as e:
                raise SinkUnavailable(f"{self.target}: {e}") from None
            except nats.js.errors.APIError as e:
                raise SinkRejected(f"{self.target}: {message.id}: {e}") from None
            if ack.duplicate:
                self.duplicates += 1

    async def close(self) -> None:
        """Drain and close the connection."""
        if self._nc is not None:
            nc, self._nc, self._js = self._nc, None, None
            with contextlib.suppress(Exception):  # closing a connection that broke
                await nc.close()
