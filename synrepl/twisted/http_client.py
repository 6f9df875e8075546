"""ReplicationHttpClient: call other Synapse processes over HTTP replication.

The Twisted adapter of :class:`synrepl.http.HttpClientCore`, which decides
everything (routing, the request, retries, errors, the answer size limit,
read-after-write); this module only carries one attempt over a Twisted
agent, sleeps and waits on the injected reactor's clock, and says how
Twisted reports each failure.

- Routing: the instance name is looked up in the configuration's
  ``instance_map`` (``main`` and ``master`` both name the main process);
  an instance that is not there is an
  :class:`~synrepl.http.UnknownInstanceError` before any I/O. TCP
  locations use ``http``, or ``https`` when ``tls: true``; ``path``
  locations connect to the unix socket.
- Retries: timeouts and connection errors are retried as the
  :class:`~synrepl.http.RetryPolicy` says, on the injected reactor's clock;
  an HTTP error answer never is. One call keeps its txn_id across retries.
- Read-after-write: an answer's ``_INT_STREAM_POS`` positions belong to the
  instance that answered; the call returns once the :class:`PositionWaiter`
  (normally the :class:`~synrepl.twisted.client.ReplicationClient`) has seen
  them, or raises :class:`~synrepl.http.PositionWaitTimeoutError`.

The reactor is always passed in, never imported.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol, cast
from urllib.parse import unquote

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer  # type: ignore[import-untyped]

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
    describe_error,
)
from synrepl.http.requests import DEFAULT_USER_AGENT
from synrepl.http.retry import RetryPolicy
from synrepl.releases import SynapseRelease

__all__ = (
    "DEFAULT_MAX_RESPONSE_SIZE",
    "DEFAULT_POSITION_WAIT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "PositionWaiter",
    "ReplicationHttpClient",
)


# zope interfaces do not type-check without a mypy plugin: the few methods
# used here are described by Protocols instead.


class _Agent(Protocol):
    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[_Response]: ...


class _Response(Protocol):
    code: int
    phrase: bytes
    headers: Headers

    def deliverBody(self, protocol: TwistedProtocol) -> None: ...


class _DelayedCall(Protocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class _Clock(Protocol):
    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> _DelayedCall: ...


class _TLSPolicy(Protocol):
    def creatorForNetloc(self, hostname: bytes, port: int) -> Any: ...


class _Pool(Protocol):
    maxPersistentPerHost: int
    cachedConnectionTimeout: int

    def closeCachedConnections(self) -> defer.Deferred[None]: ...


class _Consumer(Protocol):
    def write(self, data: bytes) -> None: ...


class PositionWaiter(Protocol):
    """What read-after-write needs: something that follows replication.

    :class:`~synrepl.twisted.client.ReplicationClient` provides it.
    """

    def wait_for_stream_position(
        self, stream: str, writer: str, token: int
    ) -> defer.Deferred[None]:
        """Fire once ``stream`` from ``writer`` has been seen up to ``token``.

        May raise :class:`ValueError` for a stream it does not follow (at
        once, or by failing the Deferred); that stream is then not waited for.
        """
        ...


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory (no cooperator, so no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: _Consumer) -> defer.Deferred[None]:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: everything was written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class _BodyReader(TwistedProtocol):
    """Collects an answer body into a :class:`BodyCollector`; cancelling it
    (or going over the limit) drops the connection."""

    def __init__(self, limit: int) -> None:
        self.finished: defer.Deferred[bytes] = defer.Deferred(lambda _: self._drop())
        self._collector = BodyCollector(limit)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        try:
            self._collector.feed(data)
        except AttemptFailed as failed:
            self.finished.errback(failed)
            self._drop()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.finished.called:
            return
        if reason is None or isinstance(reason.value, ResponseDone):
            self.finished.callback(self._collector.body())
        else:
            self.finished.errback(reason)

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


@implementer(IAgentEndpointFactory)
class _LocationEndpointFactory:
    """Connects ``http``, ``https`` and ``http+unix`` URIs (see
    :func:`synrepl.http.target_uri`)."""

    def __init__(self, reactor: Any, tls_policy: _TLSPolicy, connect_timeout: float) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        timeout = self._connect_timeout
        if uri.scheme == b"http+unix":
            path = unquote(uri.host.decode("ascii"))
            unix: Any = UNIXClientEndpoint(  # type: ignore[no-untyped-call]
                self._reactor, path, timeout=timeout
            )
            return cast(IStreamClientEndpoint, unix)
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        tcp: Any = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=timeout)
        if uri.scheme == b"https":
            creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
            return wrapClientTLS(creator, tcp)
        return cast(IStreamClientEndpoint, tcp)


def _failure_kind(error: BaseException) -> AttemptFailureKind:
    """How Twisted reports each kind of failure (see
    :data:`synrepl.http.AttemptFailureKind`)."""
    if isinstance(error, ResponseNeverReceived):
        return "tls" if any(_is_tls_error(r.value) for r in error.reasons) else "no_answer"
    if isinstance(error, ConnectTimeoutError | ConnectingCancelledError):
        return "timeout"
    if isinstance(error, ConnectError | DNSLookupError):
        return "connect"
    return "broken"


def _is_tls_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("OpenSSL")


def _is_cancellation(error: BaseException) -> bool:
    if isinstance(error, defer.CancelledError):
        return True
    if isinstance(error, ResponseNeverReceived):
        return any(reason.check(defer.CancelledError) for reason in error.reasons)
    return False


def _describe(error: BaseException) -> str:
    if isinstance(error, ResponseFailed):
        reasons = "; ".join(str(r.value) or type(r.value).__name__ for r in error.reasons)
        return f"{type(error).__name__}: {reasons}"
    return describe_error(error)


class ReplicationHttpClient(HttpClientCore[PositionWaiter]):
    """Typed HTTP replication calls to the instances of one Synapse cluster.

    Args:
        reactor: the reactor (TCP, UNIX and time); tests may pass a fake.
        config: the cluster's configuration: ``instance_map`` for routing,
            ``stream_writers`` for automatic routing,
            ``worker_replication_secret`` for authentication.
        agent: the HTTP agent to use. By default one with a small persistent
            connection pool that understands the URIs of
            :func:`~synrepl.http.target_uri`; a custom agent must too.
        position_waiter: who waits for answers' stream positions
            (read-after-write); None: answers are returned at once. May be
            set later through :attr:`position_waiter`.
        local_positions: for a process that writes streams itself: returns
            ``{stream: token}`` it has written up to; sent with every request
            that carries positions, as Synapse does, so the callee sees those
            writes first.
        timeout: seconds to wait for one attempt's whole answer (Synapse: 60
            for the headers).
        retry: when to retry timeouts and connection errors.
        position_wait_timeout: seconds to wait for an answer's positions
            (Synapse waits 5 and then goes on; synrepl raises).
        tls_policy: the TLS policy for ``tls: true`` instances (default:
            verify like a browser).
        user_agent: the User-Agent header.
        instance_name: this process's instance name, sent with
            ``local_positions``; default: the configuration's.
        max_response_size: the largest answer body accepted, in bytes.
        release: the Synapse release the cluster runs, when known: an
            endpoint it lacks is refused before any request.
    """

    def __init__(
        self,
        reactor: Any,
        config: SynapseConfig,
        *,
        agent: IAgent | None = None,
        position_waiter: PositionWaiter | None = None,
        local_positions: Callable[[], Mapping[str, int]] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        position_wait_timeout: float = DEFAULT_POSITION_WAIT_TIMEOUT,
        tls_policy: IPolicyForHTTPS | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
        instance_name: str | None = None,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        release: SynapseRelease | None = None,
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
        self._reactor = reactor
        self._clock: _Clock = reactor
        self._pool: _Pool | None = None
        if agent is None:
            pool: _Pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
            pool.maxPersistentPerHost = 5
            pool.cachedConnectionTimeout = 120
            policy: Any = tls_policy or BrowserLikePolicyForHTTPS()  # type: ignore[no-untyped-call]
            factory = _LocationEndpointFactory(reactor, policy, timeout)
            agent = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
                reactor, factory, pool=pool
            )
            self._pool = pool
        self._agent: _Agent = cast(_Agent, agent)

    def close(self) -> defer.Deferred[None]:
        """Close the pooled connections (only those of the default agent)."""
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()

    # ------------------------------------------------------------ hooks

    async def _attempt(self, attempt: HttpAttempt) -> HttpAnswer:
        headers = Headers()
        for name, value in attempt.header_lines():
            headers.addRawHeader(name.encode("ascii"), value.encode("ascii"))
        producer = None if attempt.body is None else _BytesProducer(attempt.body)
        waiting: list[defer.Deferred[Any]] = []
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            if waiting:
                waiting[-1].cancel()

        timer = self._clock.callLater(attempt.timeout, expire)
        try:
            method = attempt.method.encode("ascii")
            waiting.append(
                self._agent.request(method, attempt.uri.encode("ascii"), headers, producer)
            )
            response: _Response = await waiting[-1]
            reader = _BodyReader(attempt.max_response_size)
            waiting.append(reader.finished)
            response.deliverBody(reader)
            body: bytes = await waiting[-1]
        except AttemptFailed:
            raise
        except Exception as error:  # noqa: BLE001 - every failure is classified below
            if timed_out:
                raise AttemptFailed.timed_out(attempt.timeout) from None
            if _is_cancellation(error):
                raise defer.CancelledError() from None
            raise AttemptFailed(_failure_kind(error), _describe(error)) from None
        finally:
            if timer.active():
                timer.cancel()
        answer_headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, values in response.headers.getAllRawHeaders()
            for value in values
        )
        phrase = response.phrase.decode("ascii", "replace")
        return HttpAnswer(response.code, phrase, body, answer_headers)

    async def _sleep(self, seconds: float) -> None:
        await deferLater(self._reactor, seconds)

    async def _wait_all(
        self, waits: Mapping[str, Coroutine[Any, Any, None]], timeout: float
    ) -> set[str]:
        running = {stream: defer.ensureDeferred(wait) for stream, wait in waits.items()}
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            for wait in running.values():
                if not wait.called:
                    wait.cancel()

        timer = self._clock.callLater(timeout, expire)
        late: set[str] = set()
        try:
            for stream, wait in running.items():
                try:
                    await wait
                except defer.CancelledError:
                    if not timed_out:
                        raise
                    late.add(stream)
        finally:
            if timer.active():
                timer.cancel()
            for wait in running.values():
                wait.addErrback(lambda _: None)
                if not wait.called:
                    wait.cancel()
        return late
