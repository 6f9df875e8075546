"""Errors raised by the HTTP replication client.

Two families, as in h11: :class:`RequestArgumentError` and
:class:`UnknownInstanceError` mean *you* asked for something invalid and are
raised before any I/O; everything under :class:`ReplicationRequestError`
happened on the way to, or back from, another instance, and says which
instance and which endpoint.

None of these ever carries the replication secret, and none quotes a
request body (bodies can hold access tokens and password hashes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from synrepl.errors import ConfigError, ProtocolError, SynreplError, excerpt

__all__ = (
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
    "SYNAPSE_INTERNAL_ERROR",
)

#: Synapse's answer to any exception that is not a deliberate Matrix error
#: (``return_json_error`` in synapse/http/server.py): status, errcode and
#: error text. Its replication listener gives exactly this answer when it
#: refuses the replication secret too (the ``Authorization`` check raises a
#: plain RuntimeError, in synapse/replication/http/_base.py), so on the wire
#: a refused secret and an internal failure look the same.
SYNAPSE_INTERNAL_ERROR = (500, "M_UNKNOWN", "Internal server error")

#: Longest errcode quoted in a message (a real one is a few words).
_ERRCODE_LIMIT = 60


def quoted_text(text: str, limit: int = 200) -> str:
    """A peer's text for a one-line message: bounded, control characters escaped."""
    short = excerpt(text, limit)
    return short if short.isprintable() else repr(short)[1:-1]


class RequestArgumentError(SynreplError, TypeError):
    """The arguments given for an endpoint do not fit it (missing, unknown or
    of the wrong JSON type). Raised before anything is sent.

    Attributes:
        endpoint: the endpoint name.
        argument: the offending argument, or None when the problem is general.
        reason: what was wrong.
    """

    def __init__(self, endpoint: str, reason: str, argument: str | None = None) -> None:
        self.endpoint = endpoint
        self.argument = argument
        self.reason = reason
        where = f"{endpoint}({argument}=...)" if argument else endpoint
        super().__init__(f"{where}: {reason}")


class UnknownInstanceError(ConfigError):
    """The instance to call is not in ``instance_map``. Raised before any I/O.

    Attributes:
        instance: the instance name asked for.
        endpoint: the endpoint that was to be called.
    """

    def __init__(self, instance: str, endpoint: str, reason: str) -> None:
        self.instance = instance
        self.endpoint = endpoint
        super().__init__(f"cannot call {endpoint} on {instance!r}: {reason}", ("instance_map",))


class EndpointNotInReleaseError(SynreplError, LookupError):
    """The Synapse release the client was told it talks to has no such
    endpoint (added later, or removed): refused before any request, since
    the answer would be a 404 or an endpoint that does something else.

    Attributes:
        endpoint: the endpoint's name.
        release: the release, as text (``1.135.0``).
    """

    def __init__(self, endpoint: str, release: str, reason: str) -> None:
        super().__init__(reason)
        self.endpoint = endpoint
        self.release = release


class ReplicationRequestError(SynreplError):
    """A replication request to another instance failed.

    Attributes:
        endpoint: the endpoint name (``"send_events"``, ...).
        instance: the instance that was called (``"master"`` for the main process).
    """

    def __init__(self, message: str, *, endpoint: str, instance: str) -> None:
        self.endpoint = endpoint
        self.instance = instance
        super().__init__(f"{endpoint} on {instance}: {message}")


#: Hints for answers whose real cause Synapse hides, by (status, errcode).
_HINTS = {
    (404, "M_UNRECOGNIZED"): "is this endpoint served by that instance? some are registered "
    "only on the main process, on event persisters, or behind an experimental option",
}

_SECRET_OR_FAILURE = (
    "Synapse gives this same answer when it refuses the replication secret (a missing or "
    "different worker_replication_secret) and when the request fails inside it; "
    "that instance's log says which"
)


class HttpReplicationError(ReplicationRequestError):
    """The instance answered with an HTTP error status. Never retried.

    As Synapse does, the Matrix error in the body is taken verbatim when there
    is one; otherwise ``errcode`` is ``M_UNKNOWN`` and ``error`` the HTTP
    reason phrase.

    Attributes:
        status: the HTTP status code (409 from ``send_events`` and
            ``fed_send_events`` means the room was un-partial-stated meanwhile).
        errcode: the Matrix error code (``M_FORBIDDEN``, ``M_LIMIT_EXCEEDED``, ...).
        error: the human-readable message.
        details: the other fields of the error body (``retry_after_ms``, ...).
    """

    def __init__(
        self,
        *,
        endpoint: str,
        instance: str,
        status: int,
        errcode: str,
        error: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.errcode = errcode
        self.error = error
        self.details: Mapping[str, Any] = dict(details or {})
        message = f"HTTP {status} {quoted_text(errcode, _ERRCODE_LIMIT)}: {quoted_text(error)}"
        hint = _SECRET_OR_FAILURE if self.may_be_secret_refusal else _HINTS.get((status, errcode))
        if hint:
            message += f" ({hint})"
        super().__init__(message, endpoint=endpoint, instance=instance)

    @property
    def may_be_secret_refusal(self) -> bool:
        """True for the one answer Synapse gives to a refused replication
        secret, :data:`SYNAPSE_INTERNAL_ERROR`, which is also its answer to
        any unexpected failure. Any other answer is not about the secret."""
        return (self.status, self.errcode, self.error) == SYNAPSE_INTERNAL_ERROR


class ReplicationUnreachableError(ReplicationRequestError):
    """Could not connect to the instance, after every allowed retry.

    Attributes:
        attempts: how many connection attempts were made.
        reason: the last connection error, in words.
    """

    def __init__(self, *, endpoint: str, instance: str, attempts: int, reason: str) -> None:
        self.attempts = attempts
        self.reason = reason
        super().__init__(
            f"could not connect after {attempts} attempt(s): {excerpt(reason)}",
            endpoint=endpoint,
            instance=instance,
        )


class ReplicationTimeoutError(ReplicationRequestError):
    """No answer in time, after every allowed retry.

    The request may still have been carried out: endpoints that take a
    txn_id reuse it on every retry, so Synapse runs them at most once.

    Attributes:
        attempts: how many attempts timed out.
        timeout: the per-attempt timeout in seconds.
    """

    def __init__(self, *, endpoint: str, instance: str, attempts: int, timeout: float) -> None:
        self.attempts = attempts
        self.timeout = timeout
        super().__init__(
            f"no answer within {timeout:g} s, {attempts} attempt(s)",
            endpoint=endpoint,
            instance=instance,
        )


class ReplicationTransportError(ReplicationRequestError):
    """The connection failed in a way Synapse does not retry either (for
    example it was lost while the answer was being read).

    Attributes:
        reason: what happened, in words.
    """

    def __init__(self, *, endpoint: str, instance: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"request failed: {excerpt(reason)}", endpoint=endpoint, instance=instance)


class MalformedResponseError(ReplicationRequestError, ProtocolError):
    """A success answer whose body is not what the endpoint returns.

    Attributes:
        reason: what was wrong.
    """

    def __init__(self, *, endpoint: str, instance: str, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"malformed answer: {excerpt(reason)}", endpoint=endpoint, instance=instance
        )


class PositionWaitTimeoutError(ReplicationRequestError):
    """The request succeeded, but the stream positions its answer carried were
    not seen on replication in time (read-after-write could not be ensured).

    The write *did* happen; ``result`` holds the answer so that a caller that
    can live with stale reads may go on.

    Attributes:
        pending: ``{stream: token}`` not reached in time, written by ``instance``.
        timeout: how long was waited, in seconds.
        result: the answer body (without ``_INT_STREAM_POS``).
    """

    def __init__(
        self,
        *,
        endpoint: str,
        instance: str,
        pending: Mapping[str, int],
        timeout: float,
        result: Mapping[str, Any],
    ) -> None:
        self.pending: Mapping[str, int] = dict(pending)
        self.timeout = timeout
        self.result: Mapping[str, Any] = result
        streams = ", ".join(f"{s} to {t}" for s, t in sorted(self.pending.items()))
        super().__init__(
            f"answered, but replication did not reach {streams} from {instance} "
            f"within {timeout:g} s",
            endpoint=endpoint,
            instance=instance,
        )
