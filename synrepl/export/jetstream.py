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

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence
from typing import Any

from synrepl.errors import excerpt
from synrepl.export._messages import ExportMessage
from synrepl.export._sink import SinkRejected, SinkUnavailable

__all__ = ("JetStreamSink", "DEFAULT_DUPLICATE_WINDOW")

logger = logging.getLogger(__name__)

#: The de-duplication window of a stream the sink creates, in seconds (one day):
#: an exporter down for longer than this may store a message twice.
DEFAULT_DUPLICATE_WINDOW = 86_400.0


#: What JetStream stream names must not hold.
_NOT_IN_NAMES = frozenset(">*. /\\\t\r\n")


def _stream_name(subject: str) -> str:
    """A JetStream stream name for ``subject`` (names allow no ``.``, ``*``, ``>``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", subject)


def _without_credentials(servers: str) -> str:
    """``servers`` without any ``user:password@`` or ``token@``."""
    return re.sub(r"(^|,|//)[^/,@]*@", r"\1", servers)


def _why(error: BaseException) -> str:
    return excerpt(str(error) or type(error).__name__)


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
        if stream is not None and (not stream or any(c in _NOT_IN_NAMES for c in stream)):
            raise ValueError(
                f"a JetStream stream name has no spaces, '.', '*', '>', '/' or '\\': {stream!r}"
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
        # Two open() at once (the Exporter makes one at a time, another
        # caller may not) must not make two connections, one left reconnecting.
        self._connecting = asyncio.Lock()

    @property
    def target(self) -> str:
        """``nats://host:port/subject``, without credentials."""
        return f"{_without_credentials(self.servers).rstrip('/')}/{self.subject}"

    async def open(self) -> None:
        """Connect, and make sure a stream covers the subject."""
        import nats.errors
        import nats.js.errors

        async with self._connecting:
            if self._nc is None or self._nc.is_closed:
                await self._connect()
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
            raise SinkUnavailable(self._no_jetstream()) from None
        # The JetStream API errors are nats.errors.Error too: sort them first.
        except nats.js.errors.ServiceUnavailableError as e:
            if e.code is None:  # how nats-py reports that nothing answered the API
                raise SinkUnavailable(self._no_jetstream()) from None
            raise SinkUnavailable(f"{self.target}: JetStream: {e}") from None
        except nats.js.errors.ServerError as e:
            raise SinkUnavailable(f"{self.target}: JetStream: {e}") from None
        except nats.js.errors.APIError as e:
            raise SinkRejected(f"{self.target}: cannot create stream {self.stream}: {e}") from None
        except TimeoutError:
            raise SinkUnavailable(f"{self.target}: no answer within {self.timeout:g} s") from None
        except (nats.errors.Error, OSError) as e:
            raise SinkUnavailable(f"{self.target}: {_why(e)}") from None

    def _no_jetstream(self) -> str:
        return f"{self.target}: no JetStream here (is nats-server running with -js?)"

    async def _connect(self) -> None:
        """A new connection, within ``timeout``.

        Once connected, nats-py reconnects on its own (publishes meanwhile
        wait, and time out as SinkUnavailable); but a first connection to a
        server that is not there would be retried for ever, so it is bounded.
        """
        import nats.aio.client
        import nats.errors

        failures: list[BaseException] = []

        async def on_error(error: Exception) -> None:
            # nats-py's default logs each failed reconnect at ERROR, with a
            # traceback; the exporter warns (rate-limited) about a sink that is down.
            failures.append(error)
            del failures[:-1]
            logger.debug("%s: %s", self.target, _why(error))

        nc: Any = nats.aio.client.Client()  # (its stubs want int seconds; floats work)
        try:
            await asyncio.wait_for(
                nc.connect(
                    self.servers,
                    connect_timeout=self.timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=on_error,
                ),
                self.timeout,
            )
        except (nats.errors.Error, OSError, TimeoutError) as e:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), self.timeout)
            why = _why(failures[-1]) if failures else _why(e)
            raise SinkUnavailable(f"{self.target}: cannot connect: {why}") from None
        self._nc = nc
        self._js = nc.jetstream(timeout=self.timeout)

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
            # The JetStream API errors are nats.errors.Error too: sort them first.
            except (nats.js.errors.ServiceUnavailableError, nats.js.errors.ServerError) as e:
                raise SinkUnavailable(f"{self.target}: JetStream: {e}") from None
            except nats.js.errors.APIError as e:
                raise SinkRejected(f"{self.target} refused {message.id}: {e}") from None
            except TimeoutError:
                raise SinkUnavailable(
                    f"{self.target}: no acknowledgement within {self.timeout:g} s"
                ) from None
            except (nats.errors.Error, OSError) as e:
                raise SinkUnavailable(f"{self.target}: {_why(e)}") from None
            if ack.duplicate:
                self.duplicates += 1

    async def close(self) -> None:
        """Close the connection (and stop its reconnecting)."""
        if self._nc is not None:
            nc, self._nc, self._js = self._nc, None, None
            with contextlib.suppress(Exception):  # closing a connection that broke
                await asyncio.wait_for(nc.close(), self.timeout)
