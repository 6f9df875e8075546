"""The webhook sink: an HTTP POST per batch, signed, retried, dead-lettered.

The body is ``{"messages": [MESSAGE, ...]}`` (UTF-8 JSON).  With a secret,
``X-Synrepl-Signature: sha256=HEX`` is the HMAC-SHA256, keyed by the secret,
of ``TIMESTAMP.BODY`` (the ``X-Synrepl-Timestamp`` header's decimal seconds,
a dot, then the body bytes): a receiver recomputes it, compares in constant
time, and refuses old timestamps to stop replays.  ``Idempotency-Key`` is the
first message's id: a resent batch carries the same key, and each message
its own id, so the receiver can drop what it already has.

The receiver's answer decides what happens next:

- 2xx: acknowledged;
- 408, 425, 429, 5xx, no answer, a refused or broken connection: the
  receiver is down (:class:`SinkUnavailable`): the same batch is sent again
  with backoff, for as long as it takes, and nothing moves meanwhile;
- any other status (400, 401, 413, ... and redirects, never followed:
  aiohttp would re-send a POST as a bodiless GET): this batch is refused
  (:class:`SinkRejected`): the client's failure policy retries it a few
  times, then keeps it in the dead-letter store and goes on (or stops).

Needs the ``export`` extra (aiohttp).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from synrepl.errors import excerpt
from synrepl.export._messages import ExportMessage
from synrepl.export._sink import SinkRejected, SinkUnavailable

__all__ = ("WebhookSink", "signature", "SIGNATURE_HEADER", "TIMESTAMP_HEADER")

SIGNATURE_HEADER = "X-Synrepl-Signature"
TIMESTAMP_HEADER = "X-Synrepl-Timestamp"

#: Statuses that mean "down, try the same batch again later".
_RETRY_STATUSES = frozenset({408, 425, 429})


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Synrepl-Signature`` value: ``sha256=`` and the hex HMAC of
    ``timestamp.body`` keyed by ``secret`` (what a receiver recomputes)."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def batch_body(messages: Sequence[ExportMessage]) -> bytes:
    """``{"messages": [...]}`` from the messages' encoded JSON, without re-encoding."""
    return b'{"messages":[' + b",".join(m.data for m in messages) + b"]}"


class WebhookSink:
    """POST each batch to ``url``.

    Args:
        url: the receiver, ``http://`` or ``https://``.
        secret: the HMAC key (None: no signature header).
        timeout: seconds for the whole request; no answer in time counts as down.
        clock: the wall clock (seconds) of the timestamp header.
    """

    def __init__(
        self,
        url: str,
        *,
        secret: bytes | None = None,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"a webhook URL is http(s)://host[:port]/path, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("a webhook URL must not carry credentials; use the signing secret")
        self.url = url
        self.secret = secret
        self.timeout = timeout
        self._clock = clock
        self._session: Any = None

    @property
    def target(self) -> str:
        """The URL without its query (which may hold a token)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    async def open(self) -> None:
        """Make the HTTP session (connections are made per request, pooled)."""
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "synrepl-export"},
            )

    def headers(self, messages: Sequence[ExportMessage], body: bytes) -> dict[str, str]:
        """The request's headers for this batch and body."""
        headers = {"Content-Type": "application/json", "Idempotency-Key": messages[0].id}
        if self.secret is not None:
            timestamp = str(int(self._clock()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = signature(self.secret, timestamp, body)
        return headers

    async def send(self, messages: Sequence[ExportMessage]) -> None:
        """POST the batch; return on a 2xx answer."""
        import aiohttp

        if self._session is None:
            await self.open()
        body = batch_body(messages)
        try:
            # Never follow a redirect: aiohttp would turn a 301/302/303 into a
            # GET without the body, and its 2xx would acknowledge a batch the
            # receiver never had.
            async with self._session.post(
                self.url, data=body, headers=self.headers(messages, body), allow_redirects=False
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return
                text = excerpt(await response.text(errors="replace"))
                location = response.headers.get("Location")
        except TimeoutError:
            raise SinkUnavailable(f"{self.target}: no answer within {self.timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise SinkUnavailable(f"{self.target}: {excerpt(str(e) or type(e).__name__)}") from None
        if status >= 500 or status in _RETRY_STATUSES:
            raise SinkUnavailable(f"{self.target} answered {status}: {text}")
        if 300 <= status < 400:
            to = "" if location is None else f" to {excerpt(location)}"
            raise SinkRejected(
                f"{self.target} refused the batch at {messages[0].id}: {status}, a redirect"
                f"{to}, which a webhook does not follow: give the final URL"
            )
        raise SinkRejected(f"{self.target} refused the batch at {messages[0].id}: {status} {text}")

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
