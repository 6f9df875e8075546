"""HTTP replication for the CLI: a client that also records the ``Server``
header (Synapse puts its version there), and failures explained with a fix.

An explanation quotes what the instance answered (status, errcode, error
text, bounded) and blames the replication secret only for the answer that
Synapse gives a refused secret, and then as one of two causes: Synapse
answers ``500 M_UNKNOWN "Internal server error"`` to a missing or wrong
secret and to any unexpected failure alike.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import unquote

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer  # type: ignore[import-untyped]

from synrepl.config import SynapseConfig
from synrepl.errors import ConfigError, excerpt
from synrepl.http import (
    HttpReplicationError,
    ReplicationRequestError,
    ReplicationTimeoutError,
    ReplicationTransportError,
    ReplicationUnreachableError,
    RetryPolicy,
    StreamUpdates,
    UnknownInstanceError,
)
from synrepl.http.errors import quoted_text
from synrepl.releases import SynapseRelease
from synrepl.sharding import InstanceLocation, canonical_instance_name
from synrepl.twisted.http_client import ReplicationHttpClient

__all__ = (
    "ProbeClient",
    "Explained",
    "explain_http_failure",
    "describe_answer",
    "describe_location",
    "instance_releases",
    "HistoryUnavailable",
    "history_pages",
)

logger = logging.getLogger(__name__)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """``http``, ``https`` and ``http+unix`` URIs (see ``synrepl.http.target_uri``)."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._tls = BrowserLikePolicyForHTTPS()  # type: ignore[no-untyped-call]

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme == b"http+unix":
            path = unquote(uri.host.decode("ascii"))
            unix: Any = UNIXClientEndpoint(  # type: ignore[no-untyped-call]
                self._reactor, path, timeout=self._timeout
            )
            return cast(IStreamClientEndpoint, unix)
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        tcp: Any = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), tcp)
        return cast(IStreamClientEndpoint, tcp)


@implementer(IAgent)
class _RecordingAgent:
    """Passes requests on, remembering the last answer's ``Server`` header."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self.server: str | None = None

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self._agent.request(method, uri, headers, bodyProducer)

        def got(response: Any) -> Any:
            values = response.headers.getRawHeaders(b"server") or []
            self.server = values[0].decode("latin-1") if values else None
            return response

        return d.addCallback(got)


class ProbeClient:
    """A ``ReplicationHttpClient`` with few retries that records ``Server``."""

    def __init__(
        self, reactor: Any, config: SynapseConfig, *, timeout: float, retries: int = 0
    ) -> None:
        pool: Any = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
        inner = Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
            reactor, _EndpointFactory(reactor, timeout), pool=pool
        )
        self._agent = _RecordingAgent(inner)
        policy = RetryPolicy(
            connect_retries=retries, timeout_retries=retries, connect_base_delay=0.5, max_delay=4.0
        )
        self.http = ReplicationHttpClient(
            reactor, config, agent=cast(IAgent, self._agent), timeout=timeout, retry=policy
        )

    @property
    def server_header(self) -> str | None:
        """The ``Server`` header of the last answer (None: none, or no answer)."""
        return self._agent.server


async def instance_releases(
    reactor: Any, config: SynapseConfig, timeout: float = 5.0
) -> dict[str, SynapseRelease]:
    """The Synapse release of each ``instance_map`` instance that answers
    (its ``Server`` header); the others are left out, silently: the callers
    report unreachable instances their own way."""
    probe = ProbeClient(reactor, config, timeout=timeout)
    found: dict[str, SynapseRelease] = {}
    try:
        for name in config.instance_map:
            try:
                release = await probe.http.detect_release(name)
            except Exception as e:  # noqa: BLE001 - any failure: release unknown
                logger.debug("%s: its release is unknown: %s", name, e)
                continue
            if release is not None:
                found[canonical_instance_name(name)] = release
    finally:
        await probe.http.close()
    return found


def describe_location(location: InstanceLocation) -> str:
    if location.is_unix:
        return f"unix:{location.path}"
    return location.url_base()


@attrs.frozen
class Explained:
    """A failure in words, and what to do about it."""

    problem: str
    fix: str


def explain_http_failure(
    error: BaseException, instance: str, location: str, *, has_secret: bool
) -> Explained:
    """Turn an HTTP replication failure into a one-line problem and its fix."""
    if isinstance(error, UnknownInstanceError):
        return Explained(
            f"{instance!r} is not in instance_map",
            f"add instance_map.{instance} with host and port (or path), "
            f"or pass --instance {instance}=http://host:port",
        )
    if isinstance(error, HttpReplicationError):
        return _explain_answer(error, instance, location, has_secret=has_secret)
    if isinstance(error, ReplicationUnreachableError):
        return Explained(
            f"cannot connect to {instance} at {location}: {quoted_text(error.reason)}",
            f"is {instance} running, with an HTTP listener that has the replication "
            "resource on that address? (check instance_map and its listeners)",
        )
    if isinstance(error, ReplicationTimeoutError):
        return Explained(
            f"{instance} at {location} did not answer within {error.timeout:g} s",
            "is a firewall dropping the connection, or is the instance overloaded or stuck?",
        )
    if isinstance(error, ReplicationTransportError):
        return Explained(
            f"request to {instance} at {location} failed: {quoted_text(error.reason)}",
            "TLS settings? (instance_map.<name>.tls must match the listener's tls)",
        )
    if isinstance(error, ReplicationRequestError):
        return Explained(
            f"{instance} at {location}: {quoted_text(str(error), 400)}", "see that instance's log"
        )
    return Explained(
        f"{instance} at {location}: {type(error).__name__}: {quoted_text(str(error))}",
        "see that instance's log",
    )


def describe_answer(error: HttpReplicationError) -> str:
    """What the instance answered, quoted and bounded:
    ``HTTP 500 M_UNKNOWN 'Internal server error'``."""
    errcode = quoted_text(error.errcode, 60)
    return f"HTTP {error.status} {errcode} {quoted_text(repr(excerpt(error.error)), 260)}"


def _explain_answer(
    error: HttpReplicationError, instance: str, location: str, *, has_secret: bool
) -> Explained:
    answered = f"{instance} at {location} answered {describe_answer(error)}"
    same = "Synapse gives this same answer to both"
    if error.may_be_secret_refusal and has_secret:
        return Explained(
            f"{answered}: either it refused the replication secret, "
            f"or the request failed inside it ({same})",
            "give every process the same worker_replication_secret "
            "(or worker_replication_secret_path); if they match, that instance's log "
            "shows the failure, and a refused secret logs 'Invalid Authorization header'",
        )
    if error.may_be_secret_refusal:
        return Explained(
            f"{answered}: either it requires a replication secret and none was sent, "
            f"or the request failed inside it ({same})",
            "set worker_replication_secret as the Synapse processes have it "
            "(or pass --secret-file); if it has none, its log shows the failure, "
            "and a missing secret logs 'Missing Authorization header'",
        )
    if error.status == 404 and error.errcode in ("M_UNRECOGNIZED", "M_UNKNOWN"):
        return Explained(
            f"{answered}: not a replication listener, or it does not serve that endpoint",
            "point instance_map at the listener that has the replication resource: "
            "listeners: [{port: N, type: http, resources: [{names: [replication]}]}]",
        )
    if error.status in (401, 403):
        return Explained(
            f"{answered}: the request was refused",
            "Synapse answers a refused replication secret with a 500, not this: the "
            "endpoint itself refused, or a proxy in front of it did; see their logs",
        )
    if error.status >= 500:
        return Explained(
            f"{answered}: the request failed there "
            "(not the answer Synapse gives a refused replication secret)",
            "see that instance's log",
        )
    return Explained(answered, "see that instance's log")


class HistoryUnavailable(Exception):
    """A writer's history could not be read; ``problem`` says why, with the fix."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


async def history_pages(
    probe: ProbeClient, config: SynapseConfig, writer: str, stream: str, after: int, upto: int
) -> AsyncIterator[StreamUpdates]:
    """The pages of ``(after, upto]`` of ``writer``'s ``stream``, in order.

    Raises:
        HistoryUnavailable: the writer is not in instance_map, cannot be
            reached, refuses, or pages without moving on.
    """
    try:
        location = describe_location(config.location_of(writer))
    except ConfigError:
        raise HistoryUnavailable(
            f"{writer!r} is not in instance_map (pass --instance {writer}=http://host:port)"
        ) from None
    from_token = after
    while True:
        try:
            page = await probe.http.get_repl_stream_updates(writer, stream, from_token, upto)
        except Exception as e:  # noqa: BLE001 - explained in one line
            explained = explain_http_failure(
                e, writer, location, has_secret=config.worker_replication_secret is not None
            )
            raise HistoryUnavailable(f"{explained.problem} ({explained.fix})") from None
        yield page
        if not page.limited:
            return
        if page.upto_token <= from_token:
            raise HistoryUnavailable(
                f"{writer} returned a limited page that does not move past token {from_token}; "
                "cannot go on"
            )
        from_token = page.upto_token
