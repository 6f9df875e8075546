"""Build replication requests and read their answers, without doing any I/O.

Theory of operation
===================

A call is ``build_request`` -> (an adapter sends it, retrying as
:class:`~synrepl.http.retry.RetryPolicy` says) -> ``parse_response`` ->
(the adapter waits for the answer's stream positions) -> ``parse_result``.

The request is what Synapse's own client sends, and what its server side
matches:

- ``<METHOD> /_synapse/replication/<name>/<path args...>[/<txn_id>]``, each
  path argument URL-quoted with nothing left safe. An endpoint with neither
  path arguments nor txn_id still ends with ``/``: Synapse's route pattern
  requires it.
- Endpoints that cache take a random txn_id as the last segment; the same
  txn_id is reused on every retry of one call, so Synapse runs it once.
- ``Authorization: Bearer <worker_replication_secret>`` when a secret is set.
- POST/PUT: a JSON object body of the endpoint's fields; for endpoints that
  exchange stream positions, optionally ``"_INT_STREAM_POS": {"streams":
  {stream: token}, "instance_name": <caller>}`` so that the callee first
  waits to see the caller's writes. GET: the fields as query parameters.

An answer in 2xx is a JSON object; ``_INT_STREAM_POS``, when present, is
``{stream: token}`` for the streams the *answering* instance writes, and is
taken out of the body into :attr:`ReplicationResponse.positions`. Any other
status is an :class:`~synrepl.http.errors.HttpReplicationError` carrying the
Matrix ``errcode`` and ``error`` from the body, as Synapse relays them.

The secret lives in the request as a :class:`~synrepl.config.Secret` and is
revealed only by :meth:`ReplicationRequest.header_lines`; request reprs show
neither it nor the body (bodies can hold access tokens and password hashes).
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import attrs

from synrepl import __version__, _json
from synrepl.config import Secret
from synrepl.errors import ConfigError
from synrepl.http.endpoints import ENDPOINTS, Endpoint, Field
from synrepl.http.errors import (
    HttpReplicationError,
    MalformedResponseError,
    RequestArgumentError,
)
from synrepl.sharding import InstanceLocation, canonical_instance_name

__all__ = (
    "REPLICATION_PREFIX",
    "STREAM_POSITIONS_KEY",
    "DEFAULT_USER_AGENT",
    "RequestPositions",
    "ReplicationRequest",
    "ReplicationResponse",
    "check_arguments",
    "build_request",
    "new_txn_id",
    "target_uri",
    "parse_response",
    "parse_result",
    "lookup_endpoint",
)

#: Where every replication endpoint lives.
REPLICATION_PREFIX = "/_synapse/replication"

#: The body key that carries stream positions, both ways.
STREAM_POSITIONS_KEY = "_INT_STREAM_POS"

DEFAULT_USER_AGENT = f"synrepl/{__version__}"

_T = TypeVar("_T")
_TXN_ALPHABET = string.ascii_letters
_TXN_LENGTH = 16


def _frozen_int_map(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(value))


@attrs.frozen
class RequestPositions:
    """The caller's own stream positions, sent so the callee waits for them.

    Attach these when the calling process writes streams itself and the
    callee must see those writes before it acts (Synapse always does this).

    Attributes:
        instance_name: the caller's instance name (the writer of these tokens).
        streams: ``{stream: token}`` the caller has written up to.
    """

    instance_name: str
    streams: Mapping[str, int] = attrs.field(converter=_frozen_int_map)

    def to_json(self) -> dict[str, Any]:
        """The ``_INT_STREAM_POS`` value for a request body."""
        return {"streams": dict(self.streams), "instance_name": self.instance_name}


@attrs.frozen(repr=False)
class ReplicationRequest:
    """One request, ready for the wire.

    Attributes:
        endpoint: the endpoint name.
        method: ``POST``, ``PUT`` or ``GET``.
        path: the path, with the query string for GET.
        body: the JSON body (None for GET).
        txn_id: the txn_id segment, for endpoints that cache.
        secret: the replication secret for the Authorization header.
        user_agent: the User-Agent header.
    """

    endpoint: str
    method: str
    path: str
    body: bytes | None
    txn_id: str | None = None
    secret: Secret | None = None
    user_agent: str = DEFAULT_USER_AGENT

    @property
    def authorized(self) -> bool:
        """Whether the request carries an Authorization header."""
        return self.secret is not None and bool(self.secret.reveal())

    def header_lines(self) -> list[tuple[str, str]]:
        """The headers to send, the secret included: give them to the wire only."""
        lines = [("Accept", "application/json"), ("User-Agent", self.user_agent)]
        if self.body is not None:
            lines.append(("Content-Type", "application/json"))
        if self.secret is not None and self.secret.reveal():
            lines.append(("Authorization", "Bearer " + self.secret.reveal()))
        return lines

    def __repr__(self) -> str:
        body = "no body" if self.body is None else f"{len(self.body)}-byte body"
        auth = "with" if self.authorized else "without"
        return f"<ReplicationRequest {self.method} {self.path} ({body}, {auth} authorization)>"

    __str__ = __repr__


@attrs.frozen
class ReplicationResponse:
    """A successful answer.

    Attributes:
        endpoint: the endpoint name.
        instance: the instance that answered (canonical name: ``master``).
        body: the answer, without ``_INT_STREAM_POS``.
        positions: ``{stream: token}`` the answering instance had written up to
            when it answered; read-after-write means waiting to have seen
            these from ``instance``.
    """

    endpoint: str
    instance: str
    body: dict[str, Any] = attrs.field(repr=False)
    positions: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_int_map)


def lookup_endpoint(endpoint: Endpoint | str) -> Endpoint:
    """The table entry for a name (an :class:`Endpoint` is returned as is).

    Raises:
        RequestArgumentError: no endpoint has that name.
    """
    if isinstance(endpoint, Endpoint):
        return endpoint
    found = ENDPOINTS.get(endpoint)
    if found is None:
        raise RequestArgumentError(str(endpoint), "no such replication endpoint")
    return found


def check_arguments(endpoint: Endpoint, args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments for ``endpoint``, checked, with defaults filled in.

    Raises:
        RequestArgumentError: an argument is missing, unknown, of the wrong
            JSON type or not one of the values Synapse accepts.
    """
    known = {field.name: field for field in endpoint.arguments}
    unknown = sorted(set(args) - set(known))
    if unknown:
        expected = ", ".join(known) or "none"
        raise RequestArgumentError(
            endpoint.name, f"unknown argument(s) {', '.join(unknown)}; expected: {expected}"
        )
    checked: dict[str, Any] = {}
    for name, field in known.items():
        if name in args:
            checked[name] = _check_value(endpoint, field, args[name])
        elif field.required:
            raise RequestArgumentError(endpoint.name, "missing", name)
        else:
            checked[name] = field.default
    return checked


def _check_value(endpoint: Endpoint, field: Field, value: Any) -> Any:
    if not field.type.check(value):
        raise RequestArgumentError(
            endpoint.name, f"must be a {field.type.name}, got {type(value).__name__}", field.name
        )
    if field.choices and value not in field.choices:
        raise RequestArgumentError(
            endpoint.name, f"must be one of {', '.join(map(repr, field.choices))}", field.name
        )
    return value


def new_txn_id() -> str:
    """A fresh random txn_id (letters only, as Synapse makes them)."""
    return "".join(secrets.choice(_TXN_ALPHABET) for _ in range(_TXN_LENGTH))


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_encoder = json.JSONEncoder(allow_nan=False, separators=(",", ":"), default=_json_default)


def build_request(
    endpoint: Endpoint | str,
    args: Mapping[str, Any],
    *,
    secret: Secret | None = None,
    txn_id: str | None = None,
    positions: RequestPositions | None = None,
    user_agent: str = DEFAULT_USER_AGENT,
) -> ReplicationRequest:
    """The request for one call of ``endpoint`` with ``args``.

    Args:
        endpoint: the endpoint, or its name.
        args: path arguments and fields, by name (see the endpoint's
            ``arguments``).
        secret: ``worker_replication_secret``; sent as a Bearer token when set.
        txn_id: the txn_id for an endpoint that caches (a random one when
            None); keep it across retries of the same call.
        positions: the caller's stream positions (only for endpoints whose
            ``carries_positions`` is true).
        user_agent: the User-Agent header.

    Raises:
        RequestArgumentError: bad arguments, a txn_id for an endpoint that
            takes none, or positions for an endpoint that carries none.
        ConfigError: the secret is not ASCII (it could not be sent).
    """
    endpoint = lookup_endpoint(endpoint)
    values = check_arguments(endpoint, args)
    segments = [quote(values[name], safe="") for name in endpoint.path_args]
    if endpoint.cache:
        if txn_id is None:
            txn_id = new_txn_id()
        elif not isinstance(txn_id, str) or not txn_id:
            raise RequestArgumentError(endpoint.name, "txn_id must be a non-empty string")
        segments.append(quote(txn_id, safe=""))
    elif txn_id is not None:
        raise RequestArgumentError(endpoint.name, "this endpoint takes no txn_id")
    path = "/".join((REPLICATION_PREFIX, endpoint.name, *segments))
    if not segments:
        path += "/"
    fields = {field.name: values[field.name] for field in endpoint.fields}
    if positions is not None and not endpoint.carries_positions:
        raise RequestArgumentError(endpoint.name, "this endpoint carries no stream positions")
    body: bytes | None = None
    if endpoint.method == "GET":
        if fields:
            path += "?" + urlencode(fields, doseq=True)
    else:
        if positions is not None:
            fields[STREAM_POSITIONS_KEY] = positions.to_json()
        try:
            body = _encoder.encode(fields).encode("ascii")
        except (TypeError, ValueError) as e:
            raise RequestArgumentError(endpoint.name, f"cannot be sent as JSON: {e}") from None
    if secret is not None and not secret.reveal().isascii():
        raise ConfigError("must be ASCII text to be sent", ("worker_replication_secret",))
    return ReplicationRequest(
        endpoint=endpoint.name,
        method=endpoint.method,
        path=path,
        body=body,
        txn_id=txn_id if endpoint.cache else None,
        secret=secret,
        user_agent=user_agent,
    )


def target_uri(location: InstanceLocation, path: str) -> bytes:
    """The URI to hand to an HTTP agent for ``path`` at ``location``.

    TCP: ``http(s)://host:port<path>``. A unix socket has no URL of its own,
    so it is written ``http+unix://<socket path, quoted>/<path>``, the form
    used by requests-unixsocket; synrepl's Twisted agent understands it.
    """
    if location.path is not None:
        return f"http+unix://{quote(location.path, safe='')}{path}".encode("ascii")
    base = location.url_base()
    if not base.isascii():
        raise ConfigError(f"host {location.host!r} must be ASCII (use its punycode form)")
    return (base + path).encode("ascii")


def parse_response(
    endpoint: Endpoint | str, instance: str, status: int, body: bytes, reason: str = ""
) -> ReplicationResponse:
    """Read an answer.

    Args:
        endpoint: the endpoint (or its name) that was called.
        instance: the instance that answered.
        status: the HTTP status.
        body: the raw body.
        reason: the HTTP reason phrase (the error text when the body has none).

    Raises:
        HttpReplicationError: the status is not 2xx.
        MalformedResponseError: 2xx, but not a JSON object, or its stream
            positions are not ``{stream: integer}``.
    """
    endpoint = lookup_endpoint(endpoint)
    instance = canonical_instance_name(instance)
    if not 200 <= status < 300:
        raise _http_error(endpoint, instance, status, body, reason)

    def malformed(why: str) -> MalformedResponseError:
        return MalformedResponseError(endpoint=endpoint.name, instance=instance, reason=why)

    try:
        decoded = _json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise malformed(f"not JSON: {body[:80]!r}") from None
    if not isinstance(decoded, dict):
        raise malformed(f"not a JSON object but a {type(decoded).__name__}")
    raw_positions = decoded.pop(STREAM_POSITIONS_KEY, {})
    if not isinstance(raw_positions, dict) or not all(
        isinstance(token, int) and not isinstance(token, bool) for token in raw_positions.values()
    ):
        raise malformed(f"{STREAM_POSITIONS_KEY} must map stream names to integers")
    return ReplicationResponse(endpoint.name, instance, decoded, raw_positions)


def _http_error(
    endpoint: Endpoint, instance: str, status: int, body: bytes, reason: str
) -> HttpReplicationError:
    try:
        decoded = _json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        decoded = {}
    if not isinstance(decoded, dict):
        decoded = {}
    errcode = decoded.pop("errcode", None)
    error = decoded.pop("error", None)
    return HttpReplicationError(
        endpoint=endpoint.name,
        instance=instance,
        status=status,
        errcode=errcode if isinstance(errcode, str) else "M_UNKNOWN",
        error=error if isinstance(error, str) else reason,
        details=decoded,
    )


def parse_result(response: ReplicationResponse, parser: Callable[[Mapping[str, Any]], _T]) -> _T:
    """Type an answer body with ``parser`` (one of :mod:`synrepl.http.results`).

    Raises:
        MalformedResponseError: the body lacks a field or has one of the
            wrong type.
    """
    try:
        return parser(response.body)
    except ValueError as e:
        raise MalformedResponseError(
            endpoint=response.endpoint, instance=response.instance, reason=str(e)
        ) from None
