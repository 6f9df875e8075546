"""ReplicationHttpClient against a local twisted.web server that records requests."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, ssl
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synrepl.cli._http import explain_http_failure
from synrepl.config import SynapseConfig, config_from_dict
from synrepl.errors import ConfigError
from synrepl.http import (
    HttpReplicationError,
    MalformedResponseError,
    PositionWaitTimeoutError,
    ReplicationTimeoutError,
    ReplicationTransportError,
    ReplicationUnreachableError,
    RetryPolicy,
    StreamUpdates,
    UnknownInstanceError,
)
from synrepl.http.errors import SYNAPSE_INTERNAL_ERROR
from synrepl.twisted.http_client import ReplicationHttpClient

SECRET = "Repl-S3cret-value"
FAST = RetryPolicy(
    connect_retries=2, connect_base_delay=0.01, timeout_retries=1, timeout_delay=0.01
)

Handler = Callable[["Recorded", Request], Any]


@attrs.frozen
class Recorded:
    method: str
    uri: str
    headers: dict[str, list[str]]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.uri).path

    def json(self) -> Any:
        return json.loads(self.body)


class RecordingResource(Resource):
    """Records every request and answers with ``handler(recorded, request)``:
    ``(status, json or bytes)``, or NOT_DONE_YET to leave it hanging."""

    isLeaf = True

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.requests: list[Recorded] = []

    def render(self, request: Request) -> Any:
        recorded = Recorded(
            method=request.method.decode(),
            uri=request.uri.decode(),
            headers={
                name.decode().lower(): [v.decode() for v in values]
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            body=request.content.read(),
        )
        self.requests.append(recorded)
        result = self.handler(recorded, request)
        if result is NOT_DONE_YET:
            return NOT_DONE_YET
        status, body = result
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return body if isinstance(body, bytes) else json.dumps(body).encode()


def answer(body: Any, status: int = 200) -> Handler:
    return lambda recorded, request: (status, body)


def hang(recorded: Recorded, request: Request) -> Any:
    return NOT_DONE_YET


@contextlib.asynccontextmanager
async def serving(
    handler: Handler, *, unix: Path | None = None, tls: Any = None
) -> AsyncIterator[tuple[RecordingResource, int]]:
    resource = RecordingResource(handler)
    site = Site(resource)
    site.noisy = False
    if unix is not None:
        port = reactor.listenUNIX(str(unix), site)
        number = 0
    elif tls is not None:
        port = reactor.listenSSL(0, site, tls, interface="127.0.0.1")
        number = port.getHost().port
    else:
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        number = port.getHost().port
    try:
        yield resource, number
    finally:
        await port.stopListening()


def make_config(main_port: int, **extra: Any) -> SynapseConfig:
    instance_map = {"main": {"host": "127.0.0.1", "port": main_port}}
    instance_map.update(extra.pop("instance_map", {}))
    return config_from_dict(
        {
            "server_name": "hs",
            "worker_app": "synapse.app.generic_worker",
            "worker_name": "worker1",
            "worker_replication_secret": SECRET,
            "instance_map": instance_map,
            **extra,
        }
    )


@contextlib.asynccontextmanager
async def client_for(config: SynapseConfig, **options: Any) -> AsyncIterator[ReplicationHttpClient]:
    options.setdefault("retry", FAST)
    options.setdefault("timeout", 5.0)
    client = ReplicationHttpClient(reactor, config, **options)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def server_and_client(
    handler: Handler, **options: Any
) -> AsyncIterator[tuple[RecordingResource, ReplicationHttpClient]]:
    async with contextlib.AsyncExitStack() as stack:
        resource, port = await stack.enter_async_context(serving(handler))
        client = await stack.enter_async_context(client_for(make_config(port), **options))
        yield resource, client


def free_port() -> int:
    port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    number: int = port.getHost().port
    port.stopListening()
    return number


# --- success ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stub_sends_what_synapse_expects() -> None:
    """A stub call is one POST to the quoted path, authenticated, with a JSON body."""
    async with server_and_client(answer({"max_stream_id": 12})) as (server, client):
        result = await client.add_tag(
            user_id="@alice:hs", room_id="!room/1:hs", tag="m.favourite", content={"order": 1}
        )
    assert result == 12
    (request,) = server.requests
    assert request.method == "POST"
    assert (
        request.path == "/_synapse/replication/add_tag/%40alice%3Ahs/%21room%2F1%3Ahs/m.favourite"
    )
    assert request.headers["authorization"] == [f"Bearer {SECRET}"]
    assert request.headers["content-type"] == ["application/json"]
    assert request.json() == {"content": {"order": 1}}


@pytest_twisted.ensureDeferred
async def test_cached_endpoint_gets_a_txn_id_segment() -> None:
    async with server_and_client(answer({})) as (server, client):
        assert await client.update_current_state(room_id="!r:hs", instance="main") is None
    (request,) = server.requests
    prefix = "/_synapse/replication/update_current_state/%21r%3Ahs/"
    assert request.path.startswith(prefix)
    assert request.path[len(prefix) :].isalpha()


@pytest_twisted.ensureDeferred
async def test_generic_call_returns_the_body() -> None:
    async with server_and_client(answer({"max_stream_id": 3, "extra": True})) as (_, client):
        body = await client.call("remove_tag", "master", user_id="u", room_id="r", tag="t")
    assert body == {"max_stream_id": 3, "extra": True}


@pytest_twisted.ensureDeferred
async def test_no_authorization_without_a_secret() -> None:
    async with serving(answer({})) as (server, port):
        config = attrs.evolve(make_config(port), worker_replication_secret=None)
        async with client_for(config) as client:
            await client.handle_new_device_update()
    (request,) = server.requests
    assert "authorization" not in request.headers
    assert request.path == "/_synapse/replication/handle_new_device_update/"


@pytest_twisted.ensureDeferred
async def test_get_repl_stream_updates() -> None:
    page = {"updates": [[5, ["@u:hs", 1]], [6, ["@v:hs", 2]]], "upto_token": 6, "limited": True}
    async with server_and_client(answer(page)) as (server, client):
        result = await client.get_repl_stream_updates("master", "typing", 4, 10)
    assert result == StreamUpdates([(5, ["@u:hs", 1]), (6, ["@v:hs", 2])], 6, True)
    (request,) = server.requests
    assert request.method == "GET"
    assert request.path.startswith("/_synapse/replication/get_repl_stream_updates/typing/")
    assert parse_qs(urlsplit(request.uri).query) == {"from_token": ["4"], "upto_token": ["10"]}
    assert request.body == b""


# --- errors --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_error_is_mapped_and_not_retried() -> None:
    body = {"errcode": "M_FORBIDDEN", "error": "You shall not pass", "extra": 1}
    async with server_and_client(answer(body, status=403)) as (server, client):
        with pytest.raises(HttpReplicationError) as info:
            await client.remote_join(
                room_id="!r:remote",
                user_id="@u:hs",
                requester={"user_id": "@u:hs"},
                remote_room_hosts=["remote"],
                content={},
            )
    error = info.value
    assert (error.status, error.errcode, error.error) == (403, "M_FORBIDDEN", "You shall not pass")
    assert (error.instance, error.endpoint) == ("master", "remote_join")
    assert error.details == {"extra": 1}
    assert len(server.requests) == 1


@pytest_twisted.ensureDeferred
async def test_server_error_without_json() -> None:
    async with server_and_client(answer(b"oops", status=502)) as (server, client):
        with pytest.raises(HttpReplicationError) as info:
            await client.delete_all_pushers_for_user(user_id="@u:hs")
    assert (info.value.status, info.value.errcode) == (502, "M_UNKNOWN")
    assert len(server.requests) == 1


# --- error answers as Synapse gives them -------------------------------------------
#
# Read in Synapse 1.163.2: a replication servlet checks the Authorization
# header first (ReplicationEndpoint._check_auth in
# synapse/replication/http/_base.py) and raises a plain RuntimeError when it
# is missing, repeated or wrong; any exception that is not a SynapseError is
# answered by return_json_error (synapse/http/server.py) as a 500 with the
# body below, in canonical JSON. A SynapseError is answered with its own
# status, errcode and text.

SYNAPSE_INTERNAL_ERROR_BODY = b'{"errcode":"M_UNKNOWN","error":"Internal server error"}'


@attrs.define
class SynapseLike:
    """A handler answering as a Synapse replication listener: its auth check
    (the installed Synapse's own code) first, then ``failure`` or success."""

    server_secret: str | None
    failure: tuple[int, Any] | None = None
    refusals: list[str] = attrs.Factory(list)
    _check_auth: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        base = pytest.importorskip("synapse.replication.http._base")
        self._check_auth = base.ReplicationEndpoint._check_auth

    def __call__(self, recorded: Recorded, request: Request) -> Any:
        if self.server_secret:
            endpoint = type("Endpoint", (), {"_replication_secret": self.server_secret})()
            try:
                self._check_auth(endpoint, request)
            except RuntimeError as e:
                self.refusals.append(str(e))
                return 500, SYNAPSE_INTERNAL_ERROR_BODY
        return self.failure or (200, {"updates": [], "upto_token": 0, "limited": False})


def test_synapse_internal_error_body_is_what_synapse_encodes() -> None:
    """The body above is Synapse's error dict through Synapse's own encoder."""
    canonicaljson = pytest.importorskip("canonicaljson")
    codes = pytest.importorskip("synapse.api.errors").Codes
    body = {"error": "Internal server error", "errcode": codes.UNKNOWN}
    assert canonicaljson.encode_canonical_json(body) == SYNAPSE_INTERNAL_ERROR_BODY
    assert SYNAPSE_INTERNAL_ERROR == (500, body["errcode"], body["error"])


async def _fail_against(
    handler: SynapseLike, *, client_secret: bool = True
) -> tuple[HttpReplicationError, int]:
    async with serving(handler) as (server, port):
        config = make_config(port)
        if not client_secret:
            config = attrs.evolve(config, worker_replication_secret=None)
        async with client_for(config) as client:
            with pytest.raises(HttpReplicationError) as info:
                await client.get_repl_stream_updates("master", "caches", 0, 0)
    return info.value, len(server.requests)


@pytest_twisted.ensureDeferred
async def test_right_secret_passes_synapse_auth_check() -> None:
    handler = SynapseLike(SECRET)
    async with server_and_client(handler) as (_, client):
        await client.get_repl_stream_updates("master", "caches", 0, 0)
    assert handler.refusals == []


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_explained_as_one_of_two_causes() -> None:
    """Synapse's answer to a wrong secret is its answer to any internal
    failure: the message quotes it and names both causes, not just one."""
    handler = SynapseLike("the-secret-the-cluster-uses")
    error, requests = await _fail_against(handler)
    assert handler.refusals == ["Invalid Authorization header."]
    assert (error.status, error.errcode, error.error) == SYNAPSE_INTERNAL_ERROR
    assert error.may_be_secret_refusal
    assert requests == 1
    text = str(error)
    assert "HTTP 500 M_UNKNOWN: Internal server error" in text
    assert "worker_replication_secret" in text
    assert "when the request fails inside it" in text
    explained = explain_http_failure(error, "main", "http://h:1", has_secret=True)
    assert "answered HTTP 500 M_UNKNOWN 'Internal server error'" in explained.problem
    assert "either it refused the replication secret" in explained.problem
    assert "or the request failed inside it" in explained.problem
    assert "worker_replication_secret" in explained.fix
    assert "Invalid Authorization header" in explained.fix
    assert SECRET not in f"{text} {error!r} {explained}"


@pytest_twisted.ensureDeferred
async def test_missing_secret_is_explained_as_one_of_two_causes() -> None:
    handler = SynapseLike("the-secret-the-cluster-uses")
    error, _ = await _fail_against(handler, client_secret=False)
    assert handler.refusals == ["Missing Authorization header."]
    assert error.may_be_secret_refusal
    explained = explain_http_failure(error, "main", "http://h:1", has_secret=False)
    assert "answered HTTP 500 M_UNKNOWN 'Internal server error'" in explained.problem
    assert "either it requires a replication secret and none was sent" in explained.problem
    assert "or the request failed inside it" in explained.problem
    assert "--secret-file" in explained.fix
    assert "Missing Authorization header" in explained.fix


@pytest.mark.parametrize(
    ("status", "body", "quoted"),
    [
        # synapse/replication/http/_base.py: a worker that cannot reach the
        # instance it relays to answers with this SynapseError.
        (
            502,
            {"errcode": "M_UNKNOWN", "error": "Failed to talk to persister1 process"},
            "HTTP 502 M_UNKNOWN 'Failed to talk to persister1 process'",
        ),
        # A SynapseError(500, ...) raised by an endpoint keeps its own text.
        (
            500,
            {"errcode": "M_UNKNOWN", "error": "Could not persist the event"},
            "HTTP 500 M_UNKNOWN 'Could not persist the event'",
        ),
        (
            500,
            {"errcode": "M_LIMIT_EXCEEDED", "error": "Internal server error"},
            "HTTP 500 M_LIMIT_EXCEEDED 'Internal server error'",
        ),
        # Not Synapse's answer at all (a proxy's page): the reason phrase.
        (500, b"<html>Internal Server Error</html>", "HTTP 500 M_UNKNOWN 'Internal Server Error'"),
        (
            403,
            {"errcode": "M_FORBIDDEN", "error": "User is not in the room"},
            "HTTP 403 M_FORBIDDEN 'User is not in the room'",
        ),
    ],
    ids=["relay-502", "endpoint-500", "other-errcode", "proxy-html", "forbidden"],
)
@pytest_twisted.ensureDeferred
async def test_other_error_answers_are_not_blamed_on_the_secret(
    status: int, body: Any, quoted: str
) -> None:
    """An answer Synapse does not give a refused secret is quoted as it came,
    with no word about worker_replication_secret."""
    handler = SynapseLike(SECRET, failure=(status, body))
    error, _ = await _fail_against(handler)
    assert handler.refusals == []
    assert not error.may_be_secret_refusal
    assert "worker_replication_secret" not in str(error)
    for has_secret in (True, False):
        explained = explain_http_failure(error, "main", "http://h:1", has_secret=has_secret)
        assert f"main at http://h:1 answered {quoted}" in explained.problem
        assert "either" not in explained.problem
        assert "worker_replication_secret" not in f"{explained.problem} {explained.fix}"
        assert "--secret-file" not in explained.fix


@pytest_twisted.ensureDeferred
async def test_error_text_is_quoted_bounded_and_on_one_line() -> None:
    """A peer's error text can be anything: messages keep an excerpt, on one line."""
    text = "first line\nsecond line " + "x" * 100_000
    handler = SynapseLike(SECRET, failure=(500, {"errcode": "E" * 10_000, "error": text}))
    error, _ = await _fail_against(handler)
    assert error.error == text  # the attribute keeps it whole
    explained = explain_http_failure(error, "main", "http://h:1", has_secret=True)
    for message in (str(error), explained.problem):
        assert len(message) < 600, len(message)
        assert "\n" not in message
        assert "first line\\nsecond line" in message


@pytest_twisted.ensureDeferred
async def test_malformed_success_answer() -> None:
    async with server_and_client(answer({"event_id": 5})) as (_, client):
        with pytest.raises(MalformedResponseError, match="event_id"):
            await client.remote_rescind_knock(
                knock_event_id="$k", txn_id=None, requester={}, content={}
            )


@pytest_twisted.ensureDeferred
async def test_unknown_instance_fails_before_any_io() -> None:
    class NoAgent:
        def request(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("no request may be made")

    client = ReplicationHttpClient(reactor, make_config(1), agent=NoAgent())
    with pytest.raises(UnknownInstanceError) as info:
        await client.remove_tag(user_id="u", room_id="r", tag="t", instance="worker9")
    assert isinstance(info.value, ConfigError)
    assert "worker9" in str(info.value) and "remove_tag" in str(info.value)
    assert "main" in str(info.value) or "master" in str(info.value)


# --- retries -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_retried_then_reported(caplog: Any) -> None:
    async with client_for(make_config(free_port())) as client:
        logs = caplog.at_level(logging.WARNING, logger="synrepl.http")
        with logs, pytest.raises(ReplicationUnreachableError) as info:
            await client.remove_tag(user_id="u", room_id="r", tag="t")
    assert info.value.attempts == 3
    assert "ConnectionRefusedError" in info.value.reason
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2
    assert SECRET not in caplog.text and SECRET not in str(info.value)


def test_connection_errors_back_off_exponentially_with_a_cap() -> None:
    """On the injected clock: delays 1, 2, 4, then capped at 4, then give up."""
    clock = Clock()
    calls: list[float] = []

    class RefusingAgent:
        def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            calls.append(clock.seconds())
            return defer.fail(ConnectionRefusedError())

    client = ReplicationHttpClient(
        clock,
        make_config(1),
        agent=RefusingAgent(),
        retry=RetryPolicy(connect_retries=4, connect_base_delay=1, max_delay=4),
    )
    result = defer.ensureDeferred(client.remove_tag(user_id="u", room_id="r", tag="t"))
    for _ in range(40):
        clock.advance(0.5)
    assert calls == [0, 1, 3, 7, 11]
    failure = []
    result.addErrback(failure.append)
    assert failure and failure[0].check(ReplicationUnreachableError)
    assert failure[0].value.attempts == 5


def test_http_errors_are_never_retried_on_the_clock() -> None:
    clock = Clock()
    calls: list[float] = []

    class ErrorAgent:
        def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            calls.append(clock.seconds())
            return defer.fail(RuntimeError("something odd"))

    client = ReplicationHttpClient(clock, make_config(1), agent=ErrorAgent())
    result = defer.ensureDeferred(client.remove_tag(user_id="u", room_id="r", tag="t"))
    clock.advance(100)
    failure = []
    result.addErrback(failure.append)
    assert calls == [0]
    assert failure[0].check(ReplicationTransportError)
    assert "something odd" in str(failure[0].value)


@pytest_twisted.ensureDeferred
async def test_timeout_is_retried_with_the_same_txn_id() -> None:
    def first_hangs(recorded: Recorded, request: Request) -> Any:
        if len(server.requests) == 1:
            return NOT_DONE_YET
        return 200, {}

    async with server_and_client(first_hangs, timeout=0.3) as (server, client):
        await client.fed_cleanup_room(room_id="!r:hs")
    first, second = server.requests
    assert first.path == second.path, "a retry reuses the txn_id"


@pytest_twisted.ensureDeferred
async def test_timeout_gives_up_after_the_retries() -> None:
    async with server_and_client(hang, timeout=0.2) as (server, client):
        with pytest.raises(ReplicationTimeoutError) as info:
            await client.fed_cleanup_room(room_id="!r:hs")
    assert info.value.attempts == 2
    assert len(server.requests) == 2


@pytest_twisted.ensureDeferred
async def test_timeout_while_reading_the_body() -> None:
    """The timeout covers the whole answer, not only its headers."""

    def stall_body(recorded: Recorded, request: Request) -> Any:
        if len(server.requests) == 2:
            return 200, {}
        request.setHeader(b"Content-Length", b"100")
        request.write(b"{")
        return NOT_DONE_YET

    async with server_and_client(stall_body, timeout=0.3) as (server, client):
        await client.fed_cleanup_room(room_id="!r:hs")
    assert len(server.requests) == 2


@pytest_twisted.ensureDeferred
async def test_answer_size_is_bounded() -> None:
    big = {"max_stream_id": 1, "padding": "x" * 1000}
    async with server_and_client(answer(big), max_response_size=100) as (server, client):
        with pytest.raises(ReplicationTransportError, match="larger than 100 bytes"):
            await client.remove_tag(user_id="u", room_id="r", tag="t")
    assert len(server.requests) == 1


@pytest_twisted.ensureDeferred
async def test_cancelling_a_call_stops_it() -> None:
    async with server_and_client(hang, timeout=5.0) as (server, client):
        call = defer.ensureDeferred(client.fed_cleanup_room(room_id="!r:hs"))
        await deferLater(reactor, 0.1)
        call.cancel()
        with pytest.raises(defer.CancelledError):
            await call
        await deferLater(reactor, 0.1)
    assert len(server.requests) == 1


# --- routing -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unix_socket_location(tmp_path: Path) -> None:
    socket = tmp_path / "replication.sock"
    async with serving(answer({}), unix=socket) as (server, _):
        config = make_config(1, instance_map={"sock": {"path": str(socket)}})
        async with client_for(config) as client:
            await client.post_register(
                user_id="@u:hs", auth_result={}, access_token=None, instance="sock"
            )
    (request,) = server.requests
    assert request.path.startswith("/_synapse/replication/post_register/%40u%3Ahs/")
    assert request.headers["host"] == ["localhost"]


@pytest_twisted.ensureDeferred
async def test_routing_by_stream_writers() -> None:
    """instance=None sends presence to the presence writer, the rest to main."""
    async with serving(answer({})) as (main, main_port), serving(answer({})) as (pres, port):
        config = make_config(
            main_port,
            instance_map={"pres": {"host": "127.0.0.1", "port": port}},
            stream_writers={"presence": "pres"},
        )
        async with client_for(config) as client:
            await client.bump_presence_active_time(user_id="@u:hs", device_id="D")
            await client.membership_change(room_id="!r:hs", user_id="@u:hs", change="left")
    assert [r.path for r in pres.requests] == [
        "/_synapse/replication/bump_presence_active_time/%40u%3Ahs"
    ]
    assert [r.path for r in main.requests] == [
        "/_synapse/replication/membership_change/%21r%3Ahs/%40u%3Ahs/left"
    ]


def _self_signed() -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest_twisted.ensureDeferred
async def test_tls_location() -> None:
    key_pem, cert_pem = _self_signed()
    server_options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    trust = ssl.Certificate.loadPEM(cert_pem)

    class TrustOurCert:
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return ssl.optionsForClientTLS(hostname.decode(), trustRoot=trust)

    async with serving(answer({}), tls=server_options) as (server, port):
        config = make_config(
            1, instance_map={"secure": {"host": "localhost", "port": port, "tls": True}}
        )
        async with client_for(config, tls_policy=TrustOurCert()) as client:
            await client.remove_pusher(user_id="@u:hs", app_id="a", pushkey="k", instance="secure")
        async with client_for(config) as client:  # default policy: the cert is not trusted
            with pytest.raises(ReplicationTransportError) as info:
                await client.remove_pusher(
                    user_id="@u:hs", app_id="a", pushkey="k", instance="secure"
                )
    assert "ResponseNeverReceived" in info.value.reason, "Synapse would retry this as a timeout"
    assert "certificate verify failed" in info.value.reason
    assert len(server.requests) == 1
    assert server.requests[0].json() == {"app_id": "a", "pushkey": "k"}


# --- stream positions ------------------------------------------------------------


class FakeWaiter:
    """Records waits; fires each after ``delay`` seconds (never when None)."""

    def __init__(self, delay: float | None, follows: tuple[str, ...] | None = None) -> None:
        self.delay = delay
        self.follows = follows
        self.waits: list[tuple[str, str, int]] = []
        self.deferreds: list[defer.Deferred[None]] = []

    def wait_for_stream_position(
        self, stream: str, writer: str, token: int
    ) -> defer.Deferred[None]:
        if self.follows is not None and stream not in self.follows:
            raise ValueError(f"not following {stream}")
        self.waits.append((stream, writer, token))
        d: defer.Deferred[None] = defer.Deferred()
        if self.delay is not None:
            reactor.callLater(self.delay, d.callback, None)
        self.deferreds.append(d)
        return d


WRITTEN = {"max_stream_id": 5, "_INT_STREAM_POS": {"account_data": 5, "events": 90}}


@pytest_twisted.ensureDeferred
async def test_read_after_write_waits_for_the_answer_positions() -> None:
    waiter = FakeWaiter(delay=0.1)
    async with server_and_client(answer(WRITTEN), position_waiter=waiter) as (_, client):
        result = await client.add_user_account_data(
            user_id="@u:hs", account_data_type="m.x", content={}
        )
    assert result == 5
    assert sorted(waiter.waits) == [("account_data", "master", 5), ("events", "master", 90)]
    assert all(d.called for d in waiter.deferreds)


@pytest_twisted.ensureDeferred
async def test_read_after_write_timeout_raises_with_the_result() -> None:
    waiter = FakeWaiter(delay=None)
    options = {"position_waiter": waiter, "position_wait_timeout": 0.1}
    async with server_and_client(answer(WRITTEN), **options) as (server, client):
        with pytest.raises(PositionWaitTimeoutError) as info:
            await client.add_user_account_data(user_id="@u:hs", account_data_type="m.x", content={})
    error = info.value
    assert error.pending == {"account_data": 5, "events": 90}
    assert error.result == {"max_stream_id": 5}
    assert (error.instance, error.endpoint) == ("master", "add_user_account_data")
    assert len(server.requests) == 1, "a position timeout is not a reason to resend"


@pytest_twisted.ensureDeferred
async def test_streams_the_waiter_does_not_follow_are_skipped() -> None:
    waiter = FakeWaiter(delay=0.0, follows=("account_data",))
    async with server_and_client(answer(WRITTEN), position_waiter=waiter) as (_, client):
        await client.add_user_account_data(user_id="@u:hs", account_data_type="m.x", content={})
    assert waiter.waits == [("account_data", "master", 5)]


@pytest_twisted.ensureDeferred
async def test_own_positions_are_sent_like_synapse() -> None:
    def positions() -> dict[str, int]:
        return {"events": 33}

    options = {"local_positions": positions}
    page = {"updates": [], "upto_token": 1, "limited": False}

    def handler(recorded: Recorded, request: Request) -> Any:
        return 200, page if recorded.method == "GET" else {"max_stream_id": 1}

    async with server_and_client(handler, **options) as (server, client):
        await client.add_tag(user_id="u", room_id="r", tag="t", content={})
        await client.get_repl_stream_updates("main", "events", 0, 1)
        await client.call_endpoint(
            "remove_tag",
            "main",
            {"user_id": "u", "room_id": "r", "tag": "t"},
            stream_positions={"typing": 2},
        )
    post, get, explicit = server.requests
    assert post.json()["_INT_STREAM_POS"] == {"streams": {"events": 33}, "instance_name": "worker1"}
    assert get.body == b""
    assert explicit.json() == {
        "_INT_STREAM_POS": {"streams": {"typing": 2}, "instance_name": "worker1"}
    }


# --- secrets ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_secret_never_logged_or_shown(caplog: Any) -> None:
    async with server_and_client(answer(b"", status=500)) as (_, client):
        with caplog.at_level(logging.DEBUG), pytest.raises(HttpReplicationError) as info:
            await client.remove_tag(user_id="u", room_id="r", tag="t")
        texts = [caplog.text, str(info.value), repr(info.value), repr(client)]
    assert caplog.text
    assert not any(SECRET in text for text in texts)
