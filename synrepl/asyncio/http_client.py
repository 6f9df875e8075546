"""ReplicationHttpClient for asyncio: call other Synapse processes over HTTP replication.

The asyncio adapter of :class:`synrepl.http.HttpClientCore`, over aiohttp,
as :mod:`synrepl.twisted.http_client` is the Twisted one. The core decides
everything (routing, the request, retries, errors, the answer size limit,
read-after-write); this module only carries one attempt over an
``aiohttp.ClientSession``, sleeps and waits on the running event loop, and
says how aiohttp reports each failure.

- TCP instances (``http``, or ``https`` with ``tls: true``, verified against
  the system's CAs unless ``ssl_context`` says otherwise) share one pooled
  session; each unix-socket instance (``path``) gets a session of its own
  (an aiohttp connector connects to one socket).
- Sessions are made at the first call, on the loop that runs it: create
  the client anywhere, use it on one event loop, and ``await close()``.
- ``position_waiter.wait_for_stream_position`` must return an asyncio
  awaitable (a coroutine, task or future); ``async def`` is fine.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

try:
    import aiohttp
    from yarl import URL
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "synrepl.asyncio.http_client needs aiohttp: pip install 'synrepl[asyncio]'"
    ) from e

from synrepl.config import SynapseConfig
from synrepl.http._calls import (
    DEFAULT_MAX_RESPONSE_SIZE,
    DEFAULT_POSITION_WAIT_TIMEOUT,
    DEFAULT_TIMEOUT,
    AttemptFailed,
    AttemptFailureKind,
    BodyCollector,
    HttpAnswer,
    HttpAttempt,
    HttpClientCore,
    PositionWaiter,
    describe_error,
)
from synrepl.http.requests import DEFAULT_USER_AGENT
from synrepl.http.retry import RetryPolicy
from synrepl.releases import SynapseRelease
from synrepl.sharding import InstanceLocation

__all__ = (
    "DEFAULT_MAX_RESPONSE_SIZE",
    "DEFAULT_POSITION_WAIT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "PositionWaiter",
    "ReplicationHttpClient",
)

#: Idle pooled connections are kept this long, in seconds (as the Twisted pool).
_KEEPALIVE = 120.0

#: aiohttp would ask for compressed answers; Synapse's own client does not.
_SKIP_AUTO_HEADERS = ("Accept-Encoding",)


def _failure_kind(error: BaseException, answered: bool) -> AttemptFailureKind:
    """How aiohttp reports each kind of failure (see
    :data:`synrepl.http.AttemptFailureKind`)."""
    if isinstance(error, ssl.SSLError | aiohttp.ClientSSLError):
        return "tls"
    if isinstance(error, aiohttp.ClientConnectorError):
        return "connect"  # refused, unreachable, DNS, no such unix socket
    if isinstance(error, aiohttp.ServerTimeoutError):
        return "timeout"  # only from a session given in, with timeouts of its own
    if not answered and isinstance(error, aiohttp.ClientConnectionError | ConnectionError):
        return "no_answer"
    return "broken"


def _describe(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorError) and not isinstance(
        error, aiohttp.ClientSSLError
    ):
        return f"{type(error.os_error).__name__}: {error}"
    return describe_error(error)


def _require_task(endpoint: str) -> None:
    """aiohttp and asyncio.timeout work only inside an asyncio task; a
    coroutine driven some other way (say, awaited from a Twisted coroutine
    under the asyncio reactor) would otherwise fail with a puzzling error."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop at all
        task = None
    if task is None:
        raise RuntimeError(
            f"{endpoint}: synrepl.asyncio's HTTP client must be awaited inside an "
            "asyncio task (asyncio.run, asyncio.create_task); from Twisted, wrap the "
            "call: Deferred.fromFuture(asyncio.ensure_future(call))"
        )


class ReplicationHttpClient(HttpClientCore[PositionWaiter]):
    """Typed HTTP replication calls to the instances of one Synapse cluster, on asyncio.

    Args:
        config: the cluster's configuration: ``instance_map`` for routing,
            ``stream_writers`` for automatic routing,
            ``worker_replication_secret`` for authentication.
        position_waiter: who waits for answers' stream positions
            (read-after-write); its ``wait_for_stream_position`` returns an
            asyncio awaitable. None: answers are returned at once. May be set
            later through :attr:`position_waiter`.
        local_positions: for a process that writes streams itself: returns
            ``{stream: token}`` it has written up to; sent with every request
            that carries positions, as Synapse does, so the callee sees those
            writes first.
        timeout: seconds to wait for one attempt's whole answer (Synapse: 60
            for the headers).
        retry: when to retry timeouts and connection errors.
        position_wait_timeout: seconds to wait for an answer's positions
            (Synapse waits 5 and then goes on; synrepl raises).
        ssl_context: for ``tls: true`` instances (default: verify against the
            system's CAs and check the host name).
        user_agent: the User-Agent header.
        instance_name: this process's instance name, sent with
            ``local_positions``; default: the configuration's.
        max_response_size: the largest answer body accepted, in bytes.
        release: the Synapse release the cluster runs, when known: an
            endpoint it lacks is refused before any request.
        session: an ``aiohttp.ClientSession`` of yours for the TCP instances
            (its connector, limits and tracing); :meth:`close` leaves it open.
            Unix-socket instances always get a session of the client's own.
            Default: one the client makes, pooling connections.
    """

    def __init__(
        self,
        config: SynapseConfig,
        *,
        position_waiter: PositionWaiter | None = None,
        local_positions: Callable[[], Mapping[str, int]] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        position_wait_timeout: float = DEFAULT_POSITION_WAIT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
        instance_name: str | None = None,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        release: SynapseRelease | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        super().__init__(
            config,
            position_waiter=position_waiter,
            local_positions=local_positions,
            timeout=timeout,
            retry=retry,
            position_wait_timeout=position_wait_timeout,
            user_agent=user_agent,
            instance_name=instance_name,
            max_response_size=max_response_size,
            release=release,
        )
        # True: aiohttp's default, verified context (or the given session's).
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._given_session = session
        #: The client's own sessions: None for TCP, else the socket path.
        self._sessions: dict[str | None, aiohttp.ClientSession] = {}

    async def close(self) -> None:
        """Close the client's own sessions and their pooled connections (not a
        session given in). A later call opens new ones."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    def _session_for(self, location: InstanceLocation) -> aiohttp.ClientSession:
        if location.path is None and self._given_session is not None:
            return self._given_session
        session = self._sessions.get(location.path)
        if session is None or session.closed:
            connector: aiohttp.BaseConnector
            if location.path is not None:
                connector = aiohttp.UnixConnector(path=location.path, keepalive_timeout=_KEEPALIVE)
            else:
                connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE)
            session = aiohttp.ClientSession(
                connector=connector,
                # The core's per-attempt timeout covers everything; no other.
                timeout=aiohttp.ClientTimeout(total=None),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
            )
            self._sessions[location.path] = session
        return session

    # ------------------------------------------------------------ hooks

    async def _attempt(self, attempt: HttpAttempt) -> HttpAnswer:
        _require_task(attempt.endpoint.name)
        session = self._session_for(attempt.location)
        deadline = asyncio.timeout(attempt.timeout)
        answered = False
        try:
            async with (
                deadline,
                session.request(
                    attempt.method,
                    URL(attempt.url, encoded=True),  # already quoted: send it as it is
                    headers=attempt.header_lines(),
                    data=attempt.body,
                    skip_auto_headers=_SKIP_AUTO_HEADERS,
                    allow_redirects=False,
                    ssl=self._ssl,
                ) as response,
            ):
                answered = True
                collector = BodyCollector(attempt.max_response_size)
                try:
                    async for chunk in response.content.iter_any():
                        collector.feed(chunk)
                except AttemptFailed:
                    response.close()  # drops the connection: the rest is unread
                    raise
                return HttpAnswer(
                    response.status,
                    response.reason or "",
                    collector.body(),
                    tuple(
                        (name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in response.raw_headers
                    ),
                )
        except AttemptFailed:
            raise
        except Exception as error:  # noqa: BLE001 - every failure is classified below
            if deadline.expired():
                raise AttemptFailed.timed_out(attempt.timeout) from None
            raise AttemptFailed(_failure_kind(error, answered), _describe(error)) from None

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _wait_all(
        self, waits: Mapping[str, Coroutine[Any, Any, None]], timeout: float
    ) -> set[str]:
        tasks = {stream: asyncio.ensure_future(wait) for stream, wait in waits.items()}
        try:
            done, _ = await asyncio.wait(
                tasks.values(), timeout=timeout, return_when=asyncio.FIRST_EXCEPTION
            )
        finally:
            for task in tasks.values():
                if not task.done():
                    task.cancel()
        for task in done:
            task.result()  # raises a wait's error, if one failed
        return {stream for stream, task in tasks.items() if task not in done}
