"""Synapse's HTTP replication endpoints: the table, requests, answers and stubs.

Pure, like the rest of the core: nothing here does I/O or imports Twisted
or asyncio. The clients are
:class:`synrepl.twisted.http_client.ReplicationHttpClient` and
:class:`synrepl.asyncio.http_client.ReplicationHttpClient`, two thin adapters
of :class:`HttpClientCore`.

- :data:`ENDPOINTS`: one :class:`Endpoint` per Synapse endpoint.
- :func:`build_request` / :func:`parse_response` / :func:`parse_result`:
  the wire format, both ways.
- :class:`ReplicationStubs`: one typed method per endpoint, over one abstract
  primitive that adapters implement.
- :class:`RetryPolicy`: Synapse's retry rules, bounded.
- :func:`route_instance`: which instance an endpoint must be sent to.
- :class:`HttpClientCore`: a whole call (routing, the request, retries,
  errors, the answer size limit, read-after-write) over three hooks an
  adapter implements on its event loop: one :class:`HttpAttempt` to an
  :class:`HttpAnswer` or an :class:`AttemptFailed`, a sleep, and position
  waits with a timeout.
"""

from synrepl.http._calls import (
    RETRIED_AS,
    AttemptFailed,
    AttemptFailureKind,
    BodyCollector,
    HttpAnswer,
    HttpAttempt,
    HttpClientCore,
    PositionWaiter,
)
from synrepl.http._stubs import ReplicationStubs
from synrepl.http.endpoints import (
    EDU_WRITER_KEYS,
    ENDPOINTS,
    REQUIRED,
    SYNAPSE_VERSION,
    Endpoint,
    Field,
    JsonType,
    Route,
)
from synrepl.http.errors import (
    EndpointNotInReleaseError,
    HttpReplicationError,
    MalformedResponseError,
    PositionWaitTimeoutError,
    ReplicationRequestError,
    ReplicationTimeoutError,
    ReplicationTransportError,
    ReplicationUnreachableError,
    RequestArgumentError,
    UnknownInstanceError,
)
from synrepl.http.requests import (
    REPLICATION_PREFIX,
    STREAM_POSITIONS_KEY,
    ReplicationRequest,
    ReplicationResponse,
    RequestPositions,
    build_request,
    check_arguments,
    new_txn_id,
    parse_response,
    parse_result,
    target_uri,
)
from synrepl.http.results import EventWritten, RegisteredDevice, ResponseShape, StreamUpdates
from synrepl.http.retry import RetryPolicy
from synrepl.http.routing import route_instance
from synrepl.http.stubs import StubBase

__all__ = (
    "ENDPOINTS",
    "Endpoint",
    "Field",
    "JsonType",
    "Route",
    "REQUIRED",
    "EDU_WRITER_KEYS",
    "SYNAPSE_VERSION",
    "build_request",
    "check_arguments",
    "new_txn_id",
    "target_uri",
    "parse_response",
    "parse_result",
    "ReplicationRequest",
    "ReplicationResponse",
    "RequestPositions",
    "REPLICATION_PREFIX",
    "STREAM_POSITIONS_KEY",
    "ResponseShape",
    "EventWritten",
    "RegisteredDevice",
    "StreamUpdates",
    "RetryPolicy",
    "route_instance",
    "StubBase",
    "ReplicationStubs",
    "HttpClientCore",
    "HttpAttempt",
    "HttpAnswer",
    "AttemptFailed",
    "AttemptFailureKind",
    "RETRIED_AS",
    "BodyCollector",
    "PositionWaiter",
    "RequestArgumentError",
    "UnknownInstanceError",
    "EndpointNotInReleaseError",
    "ReplicationRequestError",
    "HttpReplicationError",
    "ReplicationUnreachableError",
    "ReplicationTimeoutError",
    "ReplicationTransportError",
    "MalformedResponseError",
    "PositionWaitTimeoutError",
)
