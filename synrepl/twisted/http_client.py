"""ReplicationHttpClient: call other Synapse processes over HTTP replication.

The Twisted adapter over :mod:`synrepl.http`: the table says what to send,
:func:`~synrepl.http.build_request` builds it, this module moves it, retries
it and waits for read-after-write, and :func:`~synrepl.http.parse_response`
reads the answer.

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

import logging
from collections.abc import Callable, Mapping
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
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
)
from zope.interface import implementer  # type: ignore[import-untyped]

from synrepl.config import SynapseConfig
from synrepl.errors import ConfigError
from synrepl.http._stubs import ReplicationStubs
from synrepl.http.endpoints import Endpoint
from synrepl.http.errors import (
    PositionWaitTimeoutError,
    ReplicationTimeoutError,
    ReplicationTransportError,
    ReplicationUnreachableError,
    UnknownInstanceError,
)
from synrepl.http.requests import (
    DEFAULT_USER_AGENT,
    ReplicationRequest,
    ReplicationResponse,
    RequestPositions,
    build_request,
    check_arguments,
    lookup_endpoint,
    parse_response,
    target_uri,
)
from synrepl.http.retry import FailureKind, RetryPolicy
from synrepl.http.routing import route_instance
from synrepl.sharding import InstanceLocation, canonical_instance_name

__all__ = ("PositionWaiter", "ReplicationHttpClient")

logger = logging.getLogger("synrepl.http")

#: Synapse's per-attempt timeout for replication requests, in seconds.
DEFAULT_TIMEOUT = 60.0

#: How long Synapse waits for a stream position before giving up, in seconds.
DEFAULT_POSITION_WAIT_TIMEOUT = 5.0

#: The largest answer body read, in bytes (Synapse sets no limit).
DEFAULT_MAX_RESPONSE_SIZE = 64 * 1024 * 1024


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

        May raise :class:`ValueError` at once for a stream it does not
        follow; that stream is then not waited for.
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


class _ResponseTooLargeError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer is larger than {limit} bytes")


class _BodyReader(TwistedProtocol):
    """Collects an answer body, up to a size limit; cancelling it (or going
    over the limit) drops the connection."""

    def __init__(self, limit: int) -> None:
        self.finished: defer.Deferred[bytes] = defer.Deferred(lambda _: self._drop())
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._chunks.clear()
            self.finished.errback(_ResponseTooLargeError(self._limit))
            self._drop()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.finished.called:
            return
        if reason is None or isinstance(reason.value, ResponseDone):
            self.finished.callback(b"".join(self._chunks))
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


def _failure_kind(error: BaseException) -> FailureKind | None:
    """How Synapse classes a transport failure: retried as a timeout, as a
    connection error, or not at all.

    One deliberate difference: Synapse retries a failed TLS handshake as if it
    had timed out; a certificate that does not verify will not verify on a
    retry either, so synrepl does not retry it.
    """
    if isinstance(error, ResponseNeverReceived):
        return None if any(_is_tls_error(r.value) for r in error.reasons) else "timeout"
    if isinstance(error, ConnectTimeoutError | ConnectingCancelledError):
        return "timeout"
    if isinstance(error, ConnectError | DNSLookupError):
        return "connect"
    return None


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
    return f"{type(error).__name__}: {error}"


class ReplicationHttpClient(ReplicationStubs):
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
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._secret = config.worker_replication_secret
        self._instance_name = canonical_instance_name(instance_name or config.instance_name)
        self._local_positions = local_positions
        self._timeout = timeout
        self._retry = retry if retry is not None else RetryPolicy()
        self._position_wait_timeout = position_wait_timeout
        self._user_agent = user_agent
        self._max_response_size = max_response_size
        self.position_waiter = position_waiter
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

    def __repr__(self) -> str:
        return f"<ReplicationHttpClient as {self._instance_name!r}>"

    @property
    def position_waiter(self) -> PositionWaiter | None:
        """Who waits for answers' stream positions (None: nobody)."""
        return self._position_waiter

    @position_waiter.setter
    def position_waiter(self, waiter: PositionWaiter | None) -> None:
        self._position_waiter = waiter

    def close(self) -> defer.Deferred[None]:
        """Close the pooled connections (only those of the default agent)."""
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()

    # ------------------------------------------------------------ calls

    async def call(
        self, endpoint: str | Endpoint, instance: str | None, /, **args: Any
    ) -> dict[str, Any]:
        """Call an endpoint by name with keyword arguments; return the answer body.

        ``instance`` None routes the call by the endpoint's rule.
        """
        response = await self.call_endpoint(endpoint, instance, args)
        return response.body

    async def call_endpoint(
        self,
        endpoint: str | Endpoint,
        instance: str | None,
        args: Mapping[str, Any],
        *,
        stream_positions: Mapping[str, int] | None = None,
        txn_id: str | None = None,
    ) -> ReplicationResponse:
        """Call an endpoint; the full form.

        Args:
            endpoint: the endpoint or its name.
            instance: the instance to call; None: by the endpoint's rule.
            args: the endpoint's arguments, by name.
            stream_positions: this process's own ``{stream: token}`` to send
                (instead of ``local_positions``).
            txn_id: the txn_id to use for an endpoint that caches (default:
                a random one). Reuse one to make a repeated call idempotent.

        Returns:
            The answer, once read-after-write holds.

        Raises:
            RequestArgumentError, UnknownInstanceError: before any I/O.
            HttpReplicationError: the instance answered an error status.
            ReplicationTransportError: the request could not be carried out
                (also as ReplicationUnreachableError, ReplicationTimeoutError).
            MalformedResponseError: the answer is not what the endpoint returns.
            PositionWaitTimeoutError: answered, but its positions were not
                seen on replication in time.
        """
        entry = lookup_endpoint(endpoint)
        check_arguments(entry, args)
        target = instance if instance is not None else route_instance(entry, self._config, args)
        location = self._locate(entry, target)
        request = build_request(
            entry,
            args,
            secret=self._secret,
            txn_id=txn_id,
            positions=self._request_positions(entry, stream_positions),
            user_agent=self._user_agent,
        )
        response = await self._send(entry, canonical_instance_name(target), location, request)
        await self._wait_for_positions(response)
        return response

    async def _send_call(
        self, endpoint: Endpoint, instance: str | None, args: Mapping[str, Any]
    ) -> ReplicationResponse:
        return await self.call_endpoint(endpoint, instance, args)

    def _locate(self, endpoint: Endpoint, instance: str) -> InstanceLocation:
        try:
            return self._config.location_of(instance)
        except ConfigError as e:
            raise UnknownInstanceError(instance, endpoint.name, e.message) from None

    def _request_positions(
        self, endpoint: Endpoint, explicit: Mapping[str, int] | None
    ) -> RequestPositions | None:
        if explicit is not None:
            return RequestPositions(self._instance_name, explicit)
        if self._local_positions is not None and endpoint.carries_positions:
            return RequestPositions(self._instance_name, self._local_positions())
        return None

    # ------------------------------------------------------------ transport

    async def _send(
        self,
        endpoint: Endpoint,
        instance: str,
        location: InstanceLocation,
        request: ReplicationRequest,
    ) -> ReplicationResponse:
        uri = target_uri(location, request.path)
        headers = Headers()
        for name, value in request.header_lines():
            headers.addRawHeader(name.encode("ascii"), value.encode("ascii"))
        if location.is_unix:
            headers.addRawHeader(b"Host", b"localhost")
        failures: dict[FailureKind, int] = {"timeout": 0, "connect": 0}
        while True:
            logger.debug("%s %s to %s", request.method, request.path, instance)
            try:
                status, phrase, body = await self._attempt(request, uri, headers)
            except _AttemptFailed as failed:
                kind, error = failed.kind, failed.error
                delay = self._retry_delay(endpoint, kind, failures)
                if delay is None:
                    raise self._give_up(endpoint, instance, kind, failures, error) from None
                logger.warning(
                    "%s to %s failed (%s); retrying in %.3g s",
                    endpoint.name,
                    instance,
                    _describe(error),
                    delay,
                )
                await deferLater(self._reactor, delay)
                continue
            return parse_response(endpoint, instance, status, body, phrase)

    def _retry_delay(
        self, endpoint: Endpoint, kind: FailureKind | None, failures: dict[FailureKind, int]
    ) -> float | None:
        if kind is None:
            return None
        failures[kind] += 1
        allowed = (
            endpoint.retry_on_timeout if kind == "timeout" else endpoint.retry_on_connect_error
        )
        return self._retry.delay(kind, failures[kind]) if allowed else None

    def _give_up(
        self,
        endpoint: Endpoint,
        instance: str,
        kind: FailureKind | None,
        failures: dict[FailureKind, int],
        error: BaseException,
    ) -> Exception:
        if kind == "timeout":
            return ReplicationTimeoutError(
                endpoint=endpoint.name,
                instance=instance,
                attempts=failures["timeout"],
                timeout=self._timeout,
            )
        if kind == "connect":
            return ReplicationUnreachableError(
                endpoint=endpoint.name,
                instance=instance,
                attempts=failures["connect"],
                reason=_describe(error),
            )
        return ReplicationTransportError(
            endpoint=endpoint.name, instance=instance, reason=_describe(error)
        )

    async def _attempt(
        self, request: ReplicationRequest, uri: bytes, headers: Headers
    ) -> tuple[int, str, bytes]:
        producer = None if request.body is None else _BytesProducer(request.body)
        waiting: list[defer.Deferred[Any]] = []
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            if waiting:
                waiting[-1].cancel()

        timer = self._clock.callLater(self._timeout, expire)
        try:
            method = request.method.encode("ascii")
            waiting.append(self._agent.request(method, uri, headers, producer))
            response: _Response = await waiting[-1]
            reader = _BodyReader(self._max_response_size)
            waiting.append(reader.finished)
            response.deliverBody(reader)
            body: bytes = await waiting[-1]
        except Exception as error:  # noqa: BLE001 - every failure is classified below
            if timed_out:
                raise _AttemptFailed("timeout", error) from None
            if _is_cancellation(error):
                raise defer.CancelledError() from None
            raise _AttemptFailed(_failure_kind(error), error) from None
        finally:
            if timer.active():
                timer.cancel()
        phrase = response.phrase.decode("ascii", "replace")
        return response.code, phrase, body

    # ------------------------------------------------------------ read-after-write

    async def _wait_for_positions(self, response: ReplicationResponse) -> None:
        waiter = self._position_waiter
        if waiter is None or not response.positions or response.instance == self._instance_name:
            return
        waits: dict[str, defer.Deferred[None]] = {}
        for stream, token in response.positions.items():
            try:
                waits[stream] = waiter.wait_for_stream_position(stream, response.instance, token)
            except ValueError:
                logger.debug("not waiting for %s: the position waiter does not follow it", stream)
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            for wait in waits.values():
                if not wait.called:
                    wait.cancel()

        timer = self._clock.callLater(self._position_wait_timeout, expire)
        missing: dict[str, int] = {}
        try:
            for stream, wait in waits.items():
                try:
                    await wait
                except defer.CancelledError:
                    if not timed_out:
                        raise
                    missing[stream] = response.positions[stream]
        finally:
            if timer.active():
                timer.cancel()
            for wait in waits.values():
                if not wait.called:
                    wait.addErrback(lambda _: None)
                    wait.cancel()
        if missing:
            raise PositionWaitTimeoutError(
                endpoint=response.endpoint,
                instance=response.instance,
                pending=missing,
                timeout=self._position_wait_timeout,
                result=response.body,
            )


class _AttemptFailed(Exception):
    """One attempt failed: how to class it, and why."""

    def __init__(self, kind: FailureKind | None, error: BaseException) -> None:
        super().__init__(kind)
        self.kind = kind
        self.error = error
