"""The Redis Streams sink: ``XADD`` each message to one stream key.

Each message is one stream entry with two fields, ``data`` (the JSON
message) and ``id`` (its stable id, so a consumer can drop a duplicate
without parsing).  A batch goes in one ``MULTI``/``EXEC``: all of its
entries or none.  ``MAXLEN ~`` bounds the key: Redis trims whole
macro-nodes, so the key holds at least ``maxlen`` entries and a little more.

Redis assigns the entry ids, so a batch sent again after a crash (between
Redis's acknowledgement and the exporter's checkpoint) is stored again:
at-least-once, the duplicates carrying the same ``id`` field.  Consumers read
with consumer groups (``XREADGROUP``/``XACK``) as usual.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.exceptions

from synrepl.errors import excerpt
from synrepl.export._messages import ExportMessage
from synrepl.export._sink import SinkRejected, SinkUnavailable

__all__ = ("RedisStreamSink", "DEFAULT_MAXLEN")

#: The default ``MAXLEN ~`` bound of the stream key.
DEFAULT_MAXLEN = 1_000_000

#: Errors after which the same XADDs succeed once Redis recovers.
_TRANSIENT_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "READONLY", "MASTERDOWN", "OOM", "CLUSTERDOWN")

#: redis-py's classes for some of those replies (it strips the code from the text).
_TRANSIENT_ERRORS = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)

#: How redis-py annotates the error of a pipeline's command.
_PIPELINE_ERROR = " of pipeline caused error: "


def _reply(error: redis.exceptions.ResponseError) -> str:
    """The server's error reply, without redis-py's pipeline annotation
    (``Command # 1 (XADD key ... the whole message ...) of pipeline caused
    error: ('WRONGTYPE ...',)``) and with the error code redis-py strips."""
    text = str(error)
    head, marker, tail = text.partition(_PIPELINE_ERROR)
    if marker and head.startswith("Command # "):
        text = tail
        try:
            value = ast.literal_eval(tail)
        except (ValueError, SyntaxError):
            pass
        else:
            if isinstance(value, tuple) and value and isinstance(value[0], str):
                text = value[0]
    code = getattr(error, "status_code", None)
    if isinstance(code, str) and code and not text.startswith(code):
        text = f"{code} {text}"
    return text


class RedisStreamSink:
    """``XADD key MAXLEN ~ maxlen * data JSON id ID`` per message.

    Args:
        url: the Redis server, ``redis://[[user]:password@]host[:port][/db]``
            (``rediss://`` for TLS, ``unix:///path`` for a socket).
        key: the stream key.
        maxlen: the approximate bound on the key's length.
        timeout: seconds to wait for a connection or a reply before the
            send counts as failed (and is tried again).
    """

    def __init__(
        self, url: str, key: str, *, maxlen: int = DEFAULT_MAXLEN, timeout: float = 10.0
    ) -> None:
        if not key:
            raise ValueError("the Redis stream key must not be empty")
        if maxlen < 1:
            raise ValueError(f"maxlen must be at least 1, got {maxlen}")
        try:  # parse the URL now: a bad one is the caller's error, not "Redis is down"
            kwargs: dict[str, Any] = redis.asyncio.ConnectionPool.from_url(url).connection_kwargs
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a Redis URL (redis://host:port/db): {e}") from None
        where = (
            kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        )
        self.url = url
        self.key = key
        self.maxlen = maxlen
        self.timeout = timeout
        self._target = f"redis-stream://{where}/{key}"
        self._redis: redis.asyncio.Redis | None = None

    @property
    def target(self) -> str:
        """``redis-stream://host:port/key``, without the password."""
        return self._target

    async def open(self) -> None:
        """Connect and check the server answers (PING)."""
        if self._redis is None:
            self._redis = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
        try:
            await self._redis.ping()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
            raise SinkUnavailable(f"{self.target}: {excerpt(str(e))}") from None

    async def send(self, messages: Sequence[ExportMessage]) -> None:
        """XADD the batch in one transaction; return once Redis answered EXEC."""
        if self._redis is None:
            await self.open()
        assert self._redis is not None
        pipe = self._redis.pipeline(transaction=True)
        for message in messages:
            pipe.xadd(
                self.key,
                {"data": message.data, "id": message.id},
                maxlen=self.maxlen,
                approximate=True,
            )
        try:
            await pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
            raise SinkUnavailable(f"{self.target}: {excerpt(str(e))}") from None
        except redis.exceptions.ResponseError as e:
            text = excerpt(_reply(e))
            if isinstance(e, _TRANSIENT_ERRORS) or text.upper().startswith(_TRANSIENT_REPLIES):
                raise SinkUnavailable(f"{self.target}: {text}") from None
            raise SinkRejected(f"{self.target} refused XADD: {text}") from None

    async def close(self) -> None:
        """Close the connection pool."""
        if self._redis is not None:
            redis_client, self._redis = self._redis, None
            await redis_client.aclose()
