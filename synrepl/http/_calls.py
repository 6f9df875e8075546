"""One HTTP replication call from start to end, for any event loop.

Theory of operation
===================

:class:`HttpClientCore` is the replication HTTP client without the wire.
:meth:`~HttpClientCore.call_endpoint` does the whole sequence:

1. check the arguments, route the call, find the instance in
   ``instance_map`` and build the request (secret, txn_id, the caller's
   stream positions): :meth:`~HttpClientCore.prepare`, before any I/O;
2. attempt it, and after a failure decide, by :class:`~synrepl.http.RetryPolicy`
   and the endpoint's retry flags, whether to try again and after how long,
   or which error to end with;
3. read the answer (:func:`~synrepl.http.parse_response`);
4. read-after-write: decide which of the answer's positions to wait for, and
   raise :class:`~synrepl.http.PositionWaitTimeoutError` for those not seen
   in time.

It awaits nothing but three hooks, which an adapter implements on its own
event loop:

- :meth:`~HttpClientCore._attempt`: send one :class:`HttpAttempt` within its
  timeout and return the :class:`HttpAnswer`, or raise :class:`AttemptFailed`
  saying, in the core's terms, what went wrong;
- :meth:`~HttpClientCore._sleep`: wait before the next attempt;
- :meth:`~HttpClientCore._wait_all`: run position waits side by side for at
  most a given time and say which did not finish.

A coroutine runs on whichever loop drives it as long as it awaits only what
that loop understands: the Twisted adapter's hooks await Deferreds, the
asyncio adapter's await futures, and the same coroutine here serves both.
What an adapter still decides is only how its library reports failures,
mapped onto :data:`AttemptFailureKind`; the consequences of each kind are
decided here, in :data:`RETRIED_AS`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Generic, Literal, Protocol, TypeVar

import attrs

from synrepl.config import SynapseConfig
from synrepl.errors import ConfigError
from synrepl.http._stubs import ReplicationStubs
from synrepl.http.endpoints import Endpoint
from synrepl.http.errors import (
    EndpointNotInReleaseError,
    HttpReplicationError,
    PositionWaitTimeoutError,
    ReplicationRequestError,
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
from synrepl.releases import ReleaseFacts, SynapseRelease, facts_for, release_in_server_header
from synrepl.sharding import InstanceLocation, canonical_instance_name

__all__ = (
    "DEFAULT_TIMEOUT",
    "DEFAULT_POSITION_WAIT_TIMEOUT",
    "DEFAULT_MAX_RESPONSE_SIZE",
    "AttemptFailureKind",
    "RETRIED_AS",
    "AttemptFailed",
    "HttpAttempt",
    "HttpAnswer",
    "BodyCollector",
    "PositionWaiter",
    "HttpClientCore",
    "describe_error",
)

logger = logging.getLogger("synrepl.http")

#: Synapse's per-attempt timeout for replication requests, in seconds.
DEFAULT_TIMEOUT = 60.0

#: How long Synapse waits for a stream position before giving up, in seconds.
DEFAULT_POSITION_WAIT_TIMEOUT = 5.0

#: The largest answer body read, in bytes (Synapse sets no limit).
DEFAULT_MAX_RESPONSE_SIZE = 64 * 1024 * 1024

#: What went wrong with one attempt, whatever the HTTP library:
#:
#: - ``timeout``: the attempt's timeout ran out (connecting or answering);
#: - ``connect``: no connection (refused, unreachable, no such host, no such
#:   unix socket);
#: - ``tls``: the TLS handshake failed (a certificate that does not verify);
#: - ``no_answer``: connected, but the connection ended before the answer
#:   began (Twisted's ``ResponseNeverReceived``);
#: - ``too_large``: the answer is larger than the limit;
#: - ``broken``: anything else (lost while reading the body, a protocol
#:   error, an unexpected exception).
AttemptFailureKind = Literal["timeout", "connect", "tls", "no_answer", "too_large", "broken"]

#: How each kind is retried, as :class:`~synrepl.http.RetryPolicy` counts it
#: (None: never). As Synapse: a connection that ends before the answer is a
#: timeout. One deliberate difference: Synapse retries a failed TLS
#: handshake as if it had timed out; a certificate that does not verify will
#: not verify on a retry either, so synrepl does not retry it.
RETRIED_AS: Mapping[AttemptFailureKind, FailureKind | None] = {
    "timeout": "timeout",
    "no_answer": "timeout",
    "connect": "connect",
    "tls": None,
    "too_large": None,
    "broken": None,
}


def describe_error(error: BaseException) -> str:
    """An exception in words for an error message: ``Type: text``."""
    return f"{type(error).__name__}: {error}"


class AttemptFailed(Exception):
    """An attempt failed: what an adapter's :meth:`HttpClientCore._attempt`
    raises, in the core's terms.

    Attributes:
        kind: what went wrong (see :data:`AttemptFailureKind`).
        reason: the failure in words, for logs and errors; never the secret
            nor a request body.
    """

    def __init__(self, kind: AttemptFailureKind, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind: AttemptFailureKind = kind
        self.reason = reason

    @classmethod
    def timed_out(cls, timeout: float) -> AttemptFailed:
        """The attempt's timeout ran out."""
        return cls("timeout", f"no answer within {timeout:g} s")

    @classmethod
    def too_large(cls, limit: int) -> AttemptFailed:
        """The answer is larger than ``limit`` bytes."""
        return cls("too_large", f"the answer is larger than {limit} bytes")


@attrs.frozen(repr=False)
class HttpAttempt:
    """One attempt, ready for the wire: where to send what, and the limits.

    Its repr shows neither the secret nor the body.

    Attributes:
        endpoint: the endpoint called.
        instance: the instance called (canonical name: ``master``).
        location: where that instance listens.
        request: the request (its headers hold the secret).
        timeout: seconds the whole attempt may take, answer body included.
        max_response_size: the largest answer body to accept, in bytes.
    """

    endpoint: Endpoint
    instance: str
    location: InstanceLocation
    request: ReplicationRequest
    timeout: float
    max_response_size: int
    #: The request's URI as :func:`~synrepl.http.target_uri` writes it
    #: (``http+unix://...`` for a unix socket).
    uri: str = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda self: target_uri(self.location, self.request.path).decode("ascii"),
            takes_self=True,
        ),
    )

    @property
    def method(self) -> str:
        """``POST``, ``PUT`` or ``GET``."""
        return self.request.method

    @property
    def body(self) -> bytes | None:
        """The JSON body (None for GET)."""
        return self.request.body

    @property
    def url(self) -> str:
        """The URL to request: ``uri`` for TCP; for a unix socket, which has no
        URL, ``http://localhost<path>``, to be sent through the socket."""
        if self.location.is_unix:
            return "http://localhost" + self.request.path
        return self.uri

    def header_lines(self) -> list[tuple[str, str]]:
        """The headers to send, the secret included: give them to the wire only.

        A unix socket has no host name; ``Host: localhost`` is sent.
        """
        lines = self.request.header_lines()
        if self.location.is_unix:
            lines.append(("Host", "localhost"))
        return lines

    def __repr__(self) -> str:
        return f"<HttpAttempt {self.request!r} to {self.instance}>"

    __str__ = __repr__


@attrs.frozen
class HttpAnswer:
    """What an attempt brought back (any status).

    Attributes:
        status: the HTTP status code.
        reason: the reason phrase.
        body: the whole body.
        headers: ``(name, value)`` pairs, as they came.
    """

    status: int
    reason: str
    body: bytes = attrs.field(repr=False)
    headers: tuple[tuple[str, str], ...] = ()


class BodyCollector:
    """Collects an answer body up to a size limit.

    Adapters feed it what they read; going over the limit raises
    :meth:`AttemptFailed.too_large`, after which the adapter drops the
    connection.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        """Take the next chunk of the body."""
        self._size += len(data)
        if self._size > self._limit:
            self._chunks.clear()
            raise AttemptFailed.too_large(self._limit)
        self._chunks.append(data)

    def body(self) -> bytes:
        """The body read so far."""
        return b"".join(self._chunks)


class PositionWaiter(Protocol):
    """What read-after-write needs: something that follows replication.

    Each adapter names the awaitable it expects: a Deferred under Twisted,
    a coroutine or future under asyncio.
    """

    def wait_for_stream_position(self, stream: str, writer: str, token: int) -> Awaitable[None]:
        """Finish once ``stream`` from ``writer`` has been seen up to ``token``.

        May raise :class:`ValueError` for a stream it does not follow (at
        once, or from the awaitable); that stream is then not waited for.
        """
        ...


_W = TypeVar("_W", bound=PositionWaiter)


class _Retries:
    """The retry decisions of one call: counts, delays and the final error."""

    def __init__(self, policy: RetryPolicy, endpoint: Endpoint) -> None:
        self._policy = policy
        self._endpoint = endpoint
        self._failures: dict[FailureKind, int] = {"timeout": 0, "connect": 0}

    def delay_after(self, failure: AttemptFailed) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        kind = RETRIED_AS[failure.kind]
        if kind is None:
            return None
        self._failures[kind] += 1
        endpoint = self._endpoint
        allowed = (
            endpoint.retry_on_timeout if kind == "timeout" else endpoint.retry_on_connect_error
        )
        return self._policy.delay(kind, self._failures[kind]) if allowed else None

    def error(self, attempt: HttpAttempt, failure: AttemptFailed) -> ReplicationRequestError:
        """The error a call ends with after ``failure``, its last."""
        name, instance = attempt.endpoint.name, attempt.instance
        kind = RETRIED_AS[failure.kind]
        if kind == "timeout":
            return ReplicationTimeoutError(
                endpoint=name,
                instance=instance,
                attempts=self._failures["timeout"],
                timeout=attempt.timeout,
            )
        if kind == "connect":
            return ReplicationUnreachableError(
                endpoint=name,
                instance=instance,
                attempts=self._failures["connect"],
                reason=failure.reason,
            )
        return ReplicationTransportError(endpoint=name, instance=instance, reason=failure.reason)


async def _position_reached(stream: str, wait: Awaitable[None]) -> None:
    try:
        await wait
    except ValueError:
        logger.debug("not waiting for %s: the position waiter does not follow it", stream)


class HttpClientCore(ReplicationStubs, Generic[_W]):
    """Typed HTTP replication calls, without the wire: adapters implement the
    hooks (see the module's theory of operation).

    Args:
        config: the cluster's configuration: ``instance_map`` for routing,
            ``stream_writers`` for automatic routing,
            ``worker_replication_secret`` for authentication.
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
        user_agent: the User-Agent header.
        instance_name: this process's instance name, sent with
            ``local_positions``; default: the configuration's.
        max_response_size: the largest answer body accepted, in bytes.
        release: the Synapse release the cluster runs, when known: an
            endpoint it lacks is refused (:class:`EndpointNotInReleaseError`)
            before any request.  None: every endpoint of
            :data:`~synrepl.releases.NEWEST` until an instance says otherwise.

    Every answer's ``Server`` header (``Synapse/1.98.0``) tells which
    release that instance runs (:attr:`releases_seen`); from then on it
    overrides ``release`` for that instance, since during a rolling upgrade
    instances run different releases.  A 404 from an instance whose release
    lacks the endpoint is an :class:`EndpointNotInReleaseError` too.
    """

    def __init__(
        self,
        config: SynapseConfig,
        *,
        position_waiter: _W | None = None,
        local_positions: Callable[[], Mapping[str, int]] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        position_wait_timeout: float = DEFAULT_POSITION_WAIT_TIMEOUT,
        user_agent: str = DEFAULT_USER_AGENT,
        instance_name: str | None = None,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        release: SynapseRelease | None = None,
    ) -> None:
        self._config = config
        self._release = None if release is None else facts_for(release)
        self._seen: dict[str, ReleaseFacts] = {}
        self._secret = config.worker_replication_secret
        self._instance_name = canonical_instance_name(instance_name or config.instance_name)
        self._local_positions = local_positions
        self._timeout = timeout
        self._retry = retry if retry is not None else RetryPolicy()
        self._position_wait_timeout = position_wait_timeout
        self._user_agent = user_agent
        self._max_response_size = max_response_size
        self._position_waiter = position_waiter

    def __repr__(self) -> str:
        return f"<{type(self).__name__} as {self._instance_name!r}>"

    @property
    def releases_seen(self) -> Mapping[str, SynapseRelease]:
        """``{instance: release}`` from the ``Server`` header of each
        instance's latest answer."""
        return {instance: facts.release for instance, facts in self._seen.items()}

    async def detect_release(self, instance: str = "master") -> SynapseRelease | None:
        """Ask ``instance`` which Synapse release it runs.

        One harmless call (an empty range of the ``caches`` stream, which
        every instance serves), whose answer's ``Server`` header names the
        release.  None: the answer named none (a proxy may replace the header).

        Raises:
            ReplicationRequestError: no answer came (an error status still
                names the release, and is not raised).
        """
        try:
            await self.get_repl_stream_updates(instance, "caches", 0, 0)
        except HttpReplicationError:
            pass
        return self.releases_seen.get(canonical_instance_name(instance))

    def _facts_of(self, instance: str) -> ReleaseFacts | None:
        return self._seen.get(instance, self._release)

    def _note_server(self, instance: str, answer: HttpAnswer) -> None:
        server = next((v for k, v in answer.headers if k.lower() == "server"), None)
        release = release_in_server_header(server)
        if release is None:
            return
        known = self._seen.get(instance)
        if known is None or known.release != release:
            logger.info("%s runs Synapse %s", instance, release)
            self._seen[instance] = facts_for(release)

    @property
    def position_waiter(self) -> _W | None:
        """Who waits for answers' stream positions (None: nobody)."""
        return self._position_waiter

    @position_waiter.setter
    def position_waiter(self, waiter: _W | None) -> None:
        self._position_waiter = waiter

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
        attempt = self.prepare(
            endpoint, instance, args, stream_positions=stream_positions, txn_id=txn_id
        )
        response = await self._send(attempt)
        await self._wait_for_positions(response)
        return response

    async def _send_call(
        self, endpoint: Endpoint, instance: str | None, args: Mapping[str, Any]
    ) -> ReplicationResponse:
        return await self.call_endpoint(endpoint, instance, args)

    def prepare(
        self,
        endpoint: str | Endpoint,
        instance: str | None,
        args: Mapping[str, Any],
        *,
        stream_positions: Mapping[str, int] | None = None,
        txn_id: str | None = None,
    ) -> HttpAttempt:
        """Everything :meth:`call_endpoint` decides before any I/O: the
        checked arguments, the instance, its location and the request.

        Raises:
            EndpointNotInReleaseError: the cluster's release has no such endpoint.
            RequestArgumentError: the arguments do not fit the endpoint, or
                decide no instance.
            UnknownInstanceError: the instance is not in ``instance_map``.
            ConfigError: the secret or the host cannot be sent.
        """
        entry = lookup_endpoint(endpoint)
        check_arguments(entry, args)
        target = instance if instance is not None else route_instance(entry, self._config, args)
        self._refuse_if_lacking(entry.name, canonical_instance_name(target))
        try:
            location = self._config.location_of(target)
        except ConfigError as e:
            raise UnknownInstanceError(target, entry.name, e.message) from None
        request = build_request(
            entry,
            args,
            secret=self._secret,
            txn_id=txn_id,
            positions=self._request_positions(entry, stream_positions),
            user_agent=self._user_agent,
        )
        return HttpAttempt(
            endpoint=entry,
            instance=canonical_instance_name(target),
            location=location,
            request=request,
            timeout=self._timeout,
            max_response_size=self._max_response_size,
        )

    def _refuse_if_lacking(self, endpoint: str, instance: str) -> None:
        facts = self._facts_of(instance)
        if facts is None:
            return
        missing = facts.lacks_endpoint(endpoint)
        if missing is not None:
            raise EndpointNotInReleaseError(endpoint, str(facts.release), missing)

    def _request_positions(
        self, endpoint: Endpoint, explicit: Mapping[str, int] | None
    ) -> RequestPositions | None:
        if explicit is not None:
            return RequestPositions(self._instance_name, explicit)
        if self._local_positions is not None and endpoint.carries_positions:
            return RequestPositions(self._instance_name, self._local_positions())
        return None

    async def _send(self, attempt: HttpAttempt) -> ReplicationResponse:
        """Attempt until an answer comes, or the retries run out."""
        retries = _Retries(self._retry, attempt.endpoint)
        while True:
            logger.debug("%s %s to %s", attempt.method, attempt.request.path, attempt.instance)
            try:
                answer = await self._attempt(attempt)
            except AttemptFailed as failure:
                delay = retries.delay_after(failure)
                if delay is None:
                    raise retries.error(attempt, failure) from None
                logger.warning(
                    "%s to %s failed (%s); retrying in %.3g s",
                    attempt.endpoint.name,
                    attempt.instance,
                    failure.reason,
                    delay,
                )
                await self._sleep(delay)
                continue
            self._note_server(attempt.instance, answer)
            if answer.status == 404:
                self._refuse_if_lacking(attempt.endpoint.name, attempt.instance)
            return parse_response(
                attempt.endpoint, attempt.instance, answer.status, answer.body, answer.reason
            )

    async def _wait_for_positions(self, response: ReplicationResponse) -> None:
        """Read-after-write: return once the waiter has seen the answer's
        positions from the instance that answered."""
        waiter = self._position_waiter
        if waiter is None or not response.positions or response.instance == self._instance_name:
            return
        waits: dict[str, Coroutine[Any, Any, None]] = {}
        for stream, token in response.positions.items():
            try:
                wait = waiter.wait_for_stream_position(stream, response.instance, token)
            except ValueError:
                logger.debug("not waiting for %s: the position waiter does not follow it", stream)
                continue
            waits[stream] = _position_reached(stream, wait)
        if not waits:
            return
        late = await self._wait_all(waits, self._position_wait_timeout)
        if late:
            raise PositionWaitTimeoutError(
                endpoint=response.endpoint,
                instance=response.instance,
                pending={stream: response.positions[stream] for stream in late},
                timeout=self._position_wait_timeout,
                result=response.body,
            )

    # ------------------------------------------------------------ hooks

    async def _attempt(self, attempt: HttpAttempt) -> HttpAnswer:
        """Send ``attempt`` once and read the whole answer, whatever its status.

        Within ``attempt.timeout`` for all of it, reading at most
        ``attempt.max_response_size`` bytes of body (:class:`BodyCollector`),
        sending :meth:`HttpAttempt.header_lines` and nothing else of the
        request's secrets. A cancellation of the call propagates as the
        loop's own cancellation.

        Raises:
            AttemptFailed: with the kind of failure, never an HTTP status.
        """
        raise NotImplementedError

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on the adapter's clock."""
        raise NotImplementedError

    async def _wait_all(
        self, waits: Mapping[str, Coroutine[Any, Any, None]], timeout: float
    ) -> set[str]:
        """Run every wait side by side, for at most ``timeout`` seconds.

        Returns the keys of the waits that had not finished by then (cancel
        them). A wait that fails raises its error (cancel the others).
        """
        raise NotImplementedError
