"""Both ReplicationHttpClients against local twisted.web servers that record requests.

Every scenario that takes the ``driver`` fixture runs twice: through
:mod:`synrepl.twisted.http_client` and through :mod:`synrepl.asyncio.http_client`.
The servers are real (TCP, TLS, a unix socket) and run on the reactor; the
asyncio client runs on an event loop of its own in a thread, so that both
clients meet exactly the same servers. At the end, the core's decisions are
checked once more with no loop and no wire at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import inspect
import json
import logging
import ssl as stdlib_ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, ssl
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synrepl.asyncio.http_client import ReplicationHttpClient as AsyncioHttpClient
from synrepl.cli._http import explain_http_failure
from synrepl.config import SynapseConfig, config_from_dict
from synrepl.errors import ConfigError
from synrepl.http import (
    AttemptFailed,
    BodyCollector,
    HttpAnswer,
    HttpAttempt,
    HttpClientCore,
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


# --- the two adapters ------------------------------------------------------------

_T = TypeVar("_T")


class FakeWaiter:
    """Records waits; each finishes after ``delay`` seconds (never when None)."""

    def __init__(self, delay: float | None, follows: tuple[str, ...] | None = None) -> None:
        self.delay = delay
        self.follows = follows
        self.waits: list[tuple[str, str, int]] = []

    def wait_for_stream_position(self, stream: str, writer: str, token: int) -> Any:
        if self.follows is not None and stream not in self.follows:
            raise ValueError(f"not following {stream}")
        self.waits.append((stream, writer, token))
        return self._wait()

    def _wait(self) -> Any:
        raise NotImplementedError

    def all_fired(self) -> bool:
        raise NotImplementedError


class TwistedWaiter(FakeWaiter):
    def __init__(self, delay: float | None, follows: tuple[str, ...] | None = None) -> None:
        super().__init__(delay, follows)
        self.deferreds: list[defer.Deferred[None]] = []

    def _wait(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.delay is not None:
            reactor.callLater(self.delay, d.callback, None)
        self.deferreds.append(d)
        return d

    def all_fired(self) -> bool:
        return all(d.called for d in self.deferreds)


class AsyncioWaiter(FakeWaiter):
    """Called on the asyncio client's loop; returns futures of that loop."""

    def __init__(self, delay: float | None, follows: tuple[str, ...] | None = None) -> None:
        super().__init__(delay, follows)
        self.futures: list[asyncio.Future[None]] = []

    def _wait(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self.delay is not None:
            loop.call_later(self.delay, lambda: future.done() or future.set_result(None))
        self.futures.append(future)
        return future

    def all_fired(self) -> bool:
        return all(f.done() and not f.cancelled() for f in self.futures)


class Driver(Protocol):
    """One adapter, as the scenarios see it from the reactor."""

    name: str
    #: The exception a refused certificate is reported as.
    tls_failure: str

    def client(self, config: SynapseConfig, **options: Any) -> Any: ...

    def waiter(self, delay: float | None, follows: tuple[str, ...] | None = None) -> FakeWaiter: ...

    def trusting(self, cert_pem: bytes) -> dict[str, Any]:
        """Client options that trust ``cert_pem``."""
        ...

    def without_io(self) -> dict[str, Any]:
        """Client options under which any I/O fails the test."""
        ...

    async def settled(self) -> bool:
        """True once nothing of the client's is still running."""
        ...


class TwistedDriver:
    name = "twisted"
    tls_failure = "ResponseNeverReceived"  # which Synapse would retry as a timeout

    def client(self, config: SynapseConfig, **options: Any) -> ReplicationHttpClient:
        return ReplicationHttpClient(reactor, config, **options)

    def waiter(self, delay: float | None, follows: tuple[str, ...] | None = None) -> FakeWaiter:
        return TwistedWaiter(delay, follows)

    def trusting(self, cert_pem: bytes) -> dict[str, Any]:
        trust = ssl.Certificate.loadPEM(cert_pem)

        class TrustOurCert:
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                return ssl.optionsForClientTLS(hostname.decode(), trustRoot=trust)

        return {"tls_policy": TrustOurCert()}

    def without_io(self) -> dict[str, Any]:
        class NoAgent:
            def request(self, *args: Any, **kwargs: Any) -> Any:
                raise AssertionError("no request may be made")

        return {"agent": NoAgent()}

    async def settled(self) -> bool:
        return True


class AsyncioDriver:
    """The asyncio client on its own event loop, in a thread; each of its
    coroutines is run there and its outcome handed back as a Deferred."""

    name = "asyncio"
    tls_failure = "ClientConnectorCertificateError"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="asyncio-client")
        self._thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def run(self, work: Coroutine[Any, Any, _T]) -> defer.Deferred[_T]:
        """Run ``work`` on the loop; cancelling the Deferred cancels it there."""
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        result: defer.Deferred[_T] = defer.Deferred(lambda _: future.cancel())

        def deliver(done: concurrent.futures.Future[_T]) -> None:
            if result.called:
                return
            if done.cancelled():
                result.errback(defer.CancelledError())
            elif done.exception() is not None:
                result.errback(done.exception())
            else:
                result.callback(done.result())

        future.add_done_callback(lambda done: reactor.callFromThread(deliver, done))
        return result

    def client(self, config: SynapseConfig, **options: Any) -> OnLoop:
        return OnLoop(AsyncioHttpClient(config, **options), self)

    def waiter(self, delay: float | None, follows: tuple[str, ...] | None = None) -> FakeWaiter:
        return AsyncioWaiter(delay, follows)

    def trusting(self, cert_pem: bytes) -> dict[str, Any]:
        return {"ssl_context": stdlib_ssl.create_default_context(cadata=cert_pem.decode())}

    def without_io(self) -> dict[str, Any]:
        class NoSession:
            def request(self, *args: Any, **kwargs: Any) -> Any:
                raise AssertionError("no request may be made")

        return {"session": NoSession()}

    async def settled(self) -> bool:
        async def others() -> int:
            return len(asyncio.all_tasks() - {asyncio.current_task()})

        return await self.run(others()) == 0


class OnLoop:
    """The asyncio client seen from the reactor: its coroutine methods run on
    the driver's loop and return Deferreds."""

    def __init__(self, client: AsyncioHttpClient, driver: AsyncioDriver) -> None:
        self.client = client
        self._driver = driver

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        def on_loop(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            return self._driver.run(attribute(*args, **kwargs))

        return on_loop

    def __repr__(self) -> str:
        return repr(self.client)


@pytest.fixture(params=["twisted", "asyncio"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    if request.param == "twisted":
        yield TwistedDriver()
        return
    running = AsyncioDriver()
    try:
        yield running
    finally:
        running.stop()


@contextlib.asynccontextmanager
async def client_for(driver: Driver, config: SynapseConfig, **options: Any) -> AsyncIterator[Any]:
    options.setdefault("retry", FAST)
    options.setdefault("timeout", 5.0)
    client = driver.client(config, **options)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def server_and_client(
    driver: Driver, handler: Handler, **options: Any
) -> AsyncIterator[tuple[RecordingResource, Any]]:
    async with contextlib.AsyncExitStack() as stack:
        resource, port = await stack.enter_async_context(serving(handler))
        client = await stack.enter_async_context(client_for(driver, make_config(port), **options))
        yield resource, client


async def free_port() -> int:
    """A port nobody listens on (closed before it is handed out: the asyncio
    client, on its own thread, would otherwise connect before the close)."""
    port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    number: int = port.getHost().port
    await port.stopListening()
    return number


# --- success ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stub_sends_what_synapse_expects(driver: Driver) -> None:
    """A stub call is one POST to the quoted path, authenticated, with a JSON body."""
    async with server_and_client(driver, answer({"max_stream_id": 12})) as (server, client):
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
async def test_asyncio_client_outside_a_task_is_a_clear_error() -> None:
    """Awaited straight from a Twisted coroutine (the suite's reactor is
    asyncio's, so a loop runs, but no task): one clear error, no request."""
    async with serving(answer({"max_stream_id": 1})) as (server, port):
        http = AsyncioHttpClient(make_config(port))
        with pytest.raises(RuntimeError, match=r"add_tag: .* inside an asyncio task"):
            await http.add_tag(user_id="@a:hs", room_id="!r:hs", tag="t", content={})
        assert server.requests == []
        # Run as a task, the same client works.
        result = await defer.Deferred.fromFuture(
            asyncio.ensure_future(
                http.add_tag(user_id="@a:hs", room_id="!r:hs", tag="t", content={})
            )
        )
        await defer.Deferred.fromFuture(asyncio.ensure_future(http.close()))
    assert result == 1 and len(server.requests) == 1


@pytest_twisted.ensureDeferred
async def test_cached_endpoint_gets_a_txn_id_segment(driver: Driver) -> None:
    async with server_and_client(driver, answer({})) as (server, client):
        assert await client.update_current_state(room_id="!r:hs", instance="main") is None
    (request,) = server.requests
    prefix = "/_synapse/replication/update_current_state/%21r%3Ahs/"
    assert request.path.startswith(prefix)
    assert request.path[len(prefix) :].isalpha()


@pytest_twisted.ensureDeferred
async def test_generic_call_returns_the_body(driver: Driver) -> None:
    async with server_and_client(driver, answer({"max_stream_id": 3, "extra": True})) as (
        _,
        client,
    ):
        body = await client.call("remove_tag", "master", user_id="u", room_id="r", tag="t")
    assert body == {"max_stream_id": 3, "extra": True}


@pytest_twisted.ensureDeferred
async def test_no_authorization_without_a_secret(driver: Driver) -> None:
    async with serving(answer({})) as (server, port):
        config = attrs.evolve(make_config(port), worker_replication_secret=None)
        async with client_for(driver, config) as client:
            await client.handle_new_device_update()
    (request,) = server.requests
    assert "authorization" not in request.headers
    assert request.path == "/_synapse/replication/handle_new_device_update/"


@pytest_twisted.ensureDeferred
async def test_get_repl_stream_updates(driver: Driver) -> None:
    page = {"updates": [[5, ["@u:hs", 1]], [6, ["@v:hs", 2]]], "upto_token": 6, "limited": True}
    async with server_and_client(driver, answer(page)) as (server, client):
        result = await client.get_repl_stream_updates("master", "typing", 4, 10)
    assert result == StreamUpdates([(5, ["@u:hs", 1]), (6, ["@v:hs", 2])], 6, True)
    (request,) = server.requests
    assert request.method == "GET"
    assert request.path.startswith("/_synapse/replication/get_repl_stream_updates/typing/")
    assert parse_qs(urlsplit(request.uri).query) == {"from_token": ["4"], "upto_token": ["10"]}
    assert request.body == b""


# --- errors --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_error_is_mapped_and_not_retried(driver: Driver) -> None:
    body = {"errcode": "M_FORBIDDEN", "error": "You shall not pass", "extra": 1}
    async with server_and_client(driver, answer(body, status=403)) as (server, client):
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
async def test_server_error_without_json(driver: Driver) -> None:
    async with server_and_client(driver, answer(b"oops", status=502)) as (server, client):
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
    driver: Driver, handler: SynapseLike, *, client_secret: bool = True
) -> tuple[HttpReplicationError, int]:
    async with serving(handler) as (server, port):
        config = make_config(port)
        if not client_secret:
            config = attrs.evolve(config, worker_replication_secret=None)
        async with client_for(driver, config) as client:
            with pytest.raises(HttpReplicationError) as info:
                await client.get_repl_stream_updates("master", "caches", 0, 0)
    return info.value, len(server.requests)


@pytest_twisted.ensureDeferred
async def test_right_secret_passes_synapse_auth_check(driver: Driver) -> None:
    handler = SynapseLike(SECRET)
    async with server_and_client(driver, handler) as (_, client):
        await client.get_repl_stream_updates("master", "caches", 0, 0)
    assert handler.refusals == []


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_explained_as_one_of_two_causes(driver: Driver) -> None:
    """Synapse's answer to a wrong secret is its answer to any internal
    failure: the message quotes it and names both causes, not just one."""
    handler = SynapseLike("the-secret-the-cluster-uses")
    error, requests = await _fail_against(driver, handler)
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
async def test_missing_secret_is_explained_as_one_of_two_causes(driver: Driver) -> None:
    handler = SynapseLike("the-secret-the-cluster-uses")
    error, _ = await _fail_against(driver, handler, client_secret=False)
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
    driver: Driver, status: int, body: Any, quoted: str
) -> None:
    """An answer Synapse does not give a refused secret is quoted as it came,
    with no word about worker_replication_secret."""
    handler = SynapseLike(SECRET, failure=(status, body))
    error, _ = await _fail_against(driver, handler)
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
async def test_error_text_is_quoted_bounded_and_on_one_line(driver: Driver) -> None:
    """A peer's error text can be anything: messages keep an excerpt, on one line."""
    text = "first line\nsecond line " + "x" * 100_000
    handler = SynapseLike(SECRET, failure=(500, {"errcode": "E" * 10_000, "error": text}))
    error, _ = await _fail_against(driver, handler)
    assert error.error == text  # the attribute keeps it whole
    explained = explain_http_failure(error, "main", "http://h:1", has_secret=True)
    for message in (str(error), explained.problem):
        assert len(message) < 600, len(message)
        assert "\n" not in message
        assert "first line\\nsecond line" in message


@pytest_twisted.ensureDeferred
async def test_malformed_success_answer(driver: Driver) -> None:
    async with server_and_client(driver, answer({"event_id": 5})) as (_, client):
        with pytest.raises(MalformedResponseError, match="event_id"):
            await client.remote_rescind_knock(
                knock_event_id="$k", txn_id=None, requester={}, content={}
            )


@pytest_twisted.ensureDeferred
async def test_unknown_instance_fails_before_any_io(driver: Driver) -> None:
    client = driver.client(make_config(1), **driver.without_io())
    with pytest.raises(UnknownInstanceError) as info:
        await client.remove_tag(user_id="u", room_id="r", tag="t", instance="worker9")
    assert isinstance(info.value, ConfigError)
    assert "worker9" in str(info.value) and "remove_tag" in str(info.value)
    assert "main" in str(info.value) or "master" in str(info.value)


# --- retries -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_retried_then_reported(driver: Driver, caplog: Any) -> None:
    async with client_for(driver, make_config(await free_port())) as client:
        logs = caplog.at_level(logging.WARNING, logger="synrepl.http")
        with logs, pytest.raises(ReplicationUnreachableError) as info:
            await client.remove_tag(user_id="u", room_id="r", tag="t")
    assert info.value.attempts == 3
    assert "ConnectionRefusedError" in info.value.reason
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2
    assert SECRET not in caplog.text and SECRET not in str(info.value)


# The reactor's clock is injected into the Twisted client; the same delays,
# decided by the core for both clients, are checked without any loop below
# (test_core_backs_off_exponentially_with_a_cap).


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
async def test_timeout_is_retried_with_the_same_txn_id(driver: Driver) -> None:
    def first_hangs(recorded: Recorded, request: Request) -> Any:
        if len(server.requests) == 1:
            return NOT_DONE_YET
        return 200, {}

    async with server_and_client(driver, first_hangs, timeout=0.3) as (server, client):
        await client.fed_cleanup_room(room_id="!r:hs")
    first, second = server.requests
    assert first.path == second.path, "a retry reuses the txn_id"


@pytest_twisted.ensureDeferred
async def test_timeout_gives_up_after_the_retries(driver: Driver) -> None:
    async with server_and_client(driver, hang, timeout=0.2) as (server, client):
        with pytest.raises(ReplicationTimeoutError) as info:
            await client.fed_cleanup_room(room_id="!r:hs")
    assert info.value.attempts == 2
    assert len(server.requests) == 2


@pytest_twisted.ensureDeferred
async def test_timeout_while_reading_the_body(driver: Driver) -> None:
    """The timeout covers the whole answer, not only its headers."""

    def stall_body(recorded: Recorded, request: Request) -> Any:
        if len(server.requests) == 2:
            return 200, {}
        request.setHeader(b"Content-Length", b"100")
        request.write(b"{")
        return NOT_DONE_YET

    async with server_and_client(driver, stall_body, timeout=0.3) as (server, client):
        await client.fed_cleanup_room(room_id="!r:hs")
    assert len(server.requests) == 2


@pytest_twisted.ensureDeferred
async def test_answer_size_is_bounded(driver: Driver) -> None:
    big = {"max_stream_id": 1, "padding": "x" * 1000}
    async with server_and_client(driver, answer(big), max_response_size=100) as (server, client):
        with pytest.raises(ReplicationTransportError, match="larger than 100 bytes"):
            await client.remove_tag(user_id="u", room_id="r", tag="t")
    assert len(server.requests) == 1


@pytest_twisted.ensureDeferred
async def test_cancelling_a_call_stops_it(driver: Driver) -> None:
    async with server_and_client(driver, hang, timeout=5.0) as (server, client):
        call = defer.ensureDeferred(client.fed_cleanup_room(room_id="!r:hs"))
        await deferLater(reactor, 0.1)
        call.cancel()
        with pytest.raises(defer.CancelledError):
            await call
        await deferLater(reactor, 0.1)
        assert await driver.settled(), "nothing of the call is left running"
    assert len(server.requests) == 1


# --- routing -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unix_socket_location(driver: Driver, tmp_path: Path) -> None:
    socket = tmp_path / "replication.sock"
    async with serving(answer({}), unix=socket) as (server, _):
        config = make_config(1, instance_map={"sock": {"path": str(socket)}})
        async with client_for(driver, config) as client:
            await client.post_register(
                user_id="@u:hs", auth_result={}, access_token=None, instance="sock"
            )
    (request,) = server.requests
    assert request.path.startswith("/_synapse/replication/post_register/%40u%3Ahs/")
    assert request.headers["host"] == ["localhost"]


@pytest_twisted.ensureDeferred
async def test_routing_by_stream_writers(driver: Driver) -> None:
    """instance=None sends presence to the presence writer, the rest to main."""
    async with serving(answer({})) as (main, main_port), serving(answer({})) as (pres, port):
        config = make_config(
            main_port,
            instance_map={"pres": {"host": "127.0.0.1", "port": port}},
            stream_writers={"presence": "pres"},
        )
        async with client_for(driver, config) as client:
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
async def test_tls_location(driver: Driver) -> None:
    key_pem, cert_pem = _self_signed()
    server_options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    async with serving(answer({}), tls=server_options) as (server, port):
        config = make_config(
            1, instance_map={"secure": {"host": "localhost", "port": port, "tls": True}}
        )
        async with client_for(driver, config, **driver.trusting(cert_pem)) as client:
            await client.remove_pusher(user_id="@u:hs", app_id="a", pushkey="k", instance="secure")
        async with client_for(driver, config) as client:  # by default the cert is not trusted
            with pytest.raises(ReplicationTransportError) as info:
                await client.remove_pusher(
                    user_id="@u:hs", app_id="a", pushkey="k", instance="secure"
                )
    assert driver.tls_failure in info.value.reason
    assert "certificate verify failed" in info.value.reason
    assert len(server.requests) == 1
    assert server.requests[0].json() == {"app_id": "a", "pushkey": "k"}


# --- stream positions ------------------------------------------------------------


WRITTEN = {"max_stream_id": 5, "_INT_STREAM_POS": {"account_data": 5, "events": 90}}


@pytest_twisted.ensureDeferred
async def test_read_after_write_waits_for_the_answer_positions(driver: Driver) -> None:
    waiter = driver.waiter(delay=0.1)
    async with server_and_client(driver, answer(WRITTEN), position_waiter=waiter) as (_, client):
        result = await client.add_user_account_data(
            user_id="@u:hs", account_data_type="m.x", content={}
        )
    assert result == 5
    assert sorted(waiter.waits) == [("account_data", "master", 5), ("events", "master", 90)]
    assert waiter.all_fired()


@pytest_twisted.ensureDeferred
async def test_read_after_write_timeout_raises_with_the_result(driver: Driver) -> None:
    waiter = driver.waiter(delay=None)
    options = {"position_waiter": waiter, "position_wait_timeout": 0.1}
    async with server_and_client(driver, answer(WRITTEN), **options) as (server, client):
        with pytest.raises(PositionWaitTimeoutError) as info:
            await client.add_user_account_data(user_id="@u:hs", account_data_type="m.x", content={})
    error = info.value
    assert error.pending == {"account_data": 5, "events": 90}
    assert error.result == {"max_stream_id": 5}
    assert (error.instance, error.endpoint) == ("master", "add_user_account_data")
    assert len(server.requests) == 1, "a position timeout is not a reason to resend"


@pytest_twisted.ensureDeferred
async def test_streams_the_waiter_does_not_follow_are_skipped(driver: Driver) -> None:
    waiter = driver.waiter(delay=0.0, follows=("account_data",))
    async with server_and_client(driver, answer(WRITTEN), position_waiter=waiter) as (_, client):
        await client.add_user_account_data(user_id="@u:hs", account_data_type="m.x", content={})
    assert waiter.waits == [("account_data", "master", 5)]


@pytest_twisted.ensureDeferred
async def test_own_positions_are_sent_like_synapse(driver: Driver) -> None:
    def positions() -> dict[str, int]:
        return {"events": 33}

    options = {"local_positions": positions}
    page = {"updates": [], "upto_token": 1, "limited": False}

    def handler(recorded: Recorded, request: Request) -> Any:
        return 200, page if recorded.method == "GET" else {"max_stream_id": 1}

    async with server_and_client(driver, handler, **options) as (server, client):
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
async def test_secret_never_logged_or_shown(driver: Driver, caplog: Any) -> None:
    async with server_and_client(driver, answer(b"", status=500)) as (_, client):
        with caplog.at_level(logging.DEBUG), pytest.raises(HttpReplicationError) as info:
            await client.remove_tag(user_id="u", room_id="r", tag="t")
        texts = [caplog.text, str(info.value), repr(info.value), repr(client)]
    assert caplog.text
    assert not any(SECRET in text for text in texts)


# --- the same wire from both adapters ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_both_clients_send_the_same_requests(tmp_path: Path) -> None:
    """Method, path, query, body and every header but Host's port are the
    same from both clients, over TCP and over a unix socket."""
    seen: dict[str, list[Any]] = {}
    socket = tmp_path / "replication.sock"
    drivers: tuple[Driver, ...] = (TwistedDriver(), AsyncioDriver())
    try:
        for driver in drivers:
            with contextlib.suppress(FileNotFoundError):
                socket.unlink()
            async with (
                serving(answer({})) as (tcp, port),
                serving(answer({}), unix=socket) as (
                    unix,
                    _,
                ),
            ):
                config = make_config(port, instance_map={"sock": {"path": str(socket)}})
                async with client_for(driver, config, local_positions=lambda: {"events": 3}) as c:
                    tag = {"user_id": "@u:hs", "room_id": "!r/1:hs", "tag": "t", "content": {}}
                    await c.call_endpoint("add_tag", None, tag)
                    await c.call_endpoint("fed_cleanup_room", "sock", {"room_id": "!r"}, txn_id="T")
                    page = {"stream_name": "events", "from_token": 0, "upto_token": 1}
                    await c.call_endpoint("get_repl_stream_updates", "main", page, txn_id="U")
            seen[driver.name] = [
                (r.method, r.uri, r.body, {k: v for k, v in r.headers.items() if k != "host"})
                for r in [*tcp.requests, *unix.requests]
            ]
            seen[driver.name].append([r.headers["host"] for r in unix.requests])
    finally:
        drivers[1].stop()  # type: ignore[attr-defined]
    assert seen["twisted"] == seen["asyncio"]
    assert seen["asyncio"][-1] == [["localhost"]]


# --- the core, with no loop and no wire -------------------------------------------
#
# HttpClientCore makes every decision; its hooks are scripted here and its
# coroutines driven by hand, without any event loop: what holds here holds
# for both adapters.


class Blocked:
    """An awaitable that never finishes (the waiter has not seen the position)."""

    def __await__(self) -> Any:
        yield self


class ScriptedCore(HttpClientCore[Any]):
    def __init__(self, config: SynapseConfig, outcomes: list[Any], **options: Any) -> None:
        super().__init__(config, **options)
        self.outcomes = outcomes
        self.attempts: list[HttpAttempt] = []
        self.slept: list[float] = []
        self.position_timeouts: list[float] = []

    async def _attempt(self, attempt: HttpAttempt) -> HttpAnswer:
        self.attempts.append(attempt)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, AttemptFailed):
            raise outcome
        assert isinstance(outcome, HttpAnswer)
        return outcome

    async def _sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    async def _wait_all(
        self, waits: Mapping[str, Coroutine[Any, Any, None]], timeout: float
    ) -> set[str]:
        self.position_timeouts.append(timeout)
        late = set()
        for stream, wait in waits.items():
            try:
                wait.send(None)
            except StopIteration:
                continue
            wait.close()
            late.add(stream)
        return late


def without_a_loop(work: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never blocks, with no event loop at all."""
    try:
        work.send(None)
    except StopIteration as done:
        result: _T = done.value
        return result
    raise AssertionError("the coroutine blocked")


def ok(body: Any = None, status: int = 200) -> HttpAnswer:
    return HttpAnswer(status, "OK", json.dumps({} if body is None else body).encode())


def refused() -> AttemptFailed:
    return AttemptFailed("connect", "ConnectionRefusedError: refused")


REMOVE_TAG = {"user_id": "u", "room_id": "r", "tag": "t"}


def test_core_backs_off_exponentially_with_a_cap() -> None:
    core = ScriptedCore(
        make_config(1),
        [refused() for _ in range(5)],
        retry=RetryPolicy(connect_retries=4, connect_base_delay=1, max_delay=4),
    )
    with pytest.raises(ReplicationUnreachableError) as info:
        without_a_loop(core.call("remove_tag", None, **REMOVE_TAG))
    assert core.slept == [1, 2, 4, 4]
    assert info.value.attempts == 5
    assert info.value.reason == "ConnectionRefusedError: refused"
    assert len({a.request.path for a in core.attempts}) == 1


@pytest.mark.parametrize(
    ("kind", "error", "attempts"),
    [
        ("timeout", ReplicationTimeoutError, 3),
        ("no_answer", ReplicationTimeoutError, 3),
        ("connect", ReplicationUnreachableError, 4),
        ("tls", ReplicationTransportError, 1),
        ("too_large", ReplicationTransportError, 1),
        ("broken", ReplicationTransportError, 1),
    ],
)
def test_core_retries_each_kind_of_failure_as_it_should(
    kind: Any, error: type[Exception], attempts: int
) -> None:
    """Timeouts (and connections that end before any answer) and connection
    errors are retried, each by its own count; nothing else is."""
    policy = RetryPolicy(connect_retries=3, timeout_retries=2, connect_base_delay=0.5)
    failures = [AttemptFailed(kind, f"{kind} happened") for _ in range(attempts)]
    core = ScriptedCore(make_config(1), failures, retry=policy, timeout=7)
    with pytest.raises(error) as info:
        without_a_loop(core.call("fed_cleanup_room", None, room_id="!r:hs"))
    assert len(core.attempts) == attempts
    assert len({a.request.path for a in core.attempts}) == 1, "one txn_id for every attempt"
    assert len(core.slept) == attempts - 1
    if error is ReplicationTimeoutError:
        assert info.value.attempts == attempts and info.value.timeout == 7  # type: ignore[attr-defined]
    if error is ReplicationTransportError:
        assert info.value.reason == f"{kind} happened"  # type: ignore[attr-defined]


def test_core_retries_then_succeeds_and_never_retries_an_answer() -> None:
    core = ScriptedCore(
        make_config(1),
        [refused(), AttemptFailed.timed_out(5), ok({"errcode": "M_FORBIDDEN"}, status=403)],
        retry=FAST,
    )
    with pytest.raises(HttpReplicationError) as info:
        without_a_loop(core.call("remove_tag", None, **REMOVE_TAG))
    assert (info.value.status, info.value.errcode) == (403, "M_FORBIDDEN")
    assert len(core.attempts) == 3 and core.outcomes == []


def test_core_prepares_the_attempt_before_any_io(tmp_path: Path) -> None:
    socket = str(tmp_path / "r.sock")
    config = make_config(8008, instance_map={"sock": {"path": socket}})
    core = ScriptedCore(config, [], max_response_size=123, timeout=9)
    tcp = core.prepare("remove_tag", None, REMOVE_TAG)
    assert (tcp.instance, tcp.timeout, tcp.max_response_size) == ("master", 9, 123)
    assert tcp.url == tcp.uri == "http://127.0.0.1:8008/_synapse/replication/remove_tag/u/r/t"
    assert ("Authorization", f"Bearer {SECRET}") in tcp.header_lines()
    assert SECRET not in f"{tcp!r} {tcp}"
    unix = core.prepare("remove_tag", "sock", REMOVE_TAG)
    assert unix.url == "http://localhost/_synapse/replication/remove_tag/u/r/t"
    assert unix.uri.startswith("http+unix://")
    assert ("Host", "localhost") in unix.header_lines()
    with pytest.raises(UnknownInstanceError):
        core.prepare("remove_tag", "nowhere", REMOVE_TAG)
    assert core.attempts == []


class CoreWaiter:
    """Finishes at once, never, or raises ValueError (at once or awaited)."""

    def __init__(self, plan: dict[str, str]) -> None:
        self.plan = plan

    def wait_for_stream_position(self, stream: str, writer: str, token: int) -> Any:
        how = self.plan[stream]
        if how == "unfollowed-at-once":
            raise ValueError(stream)
        return self._wait(how)

    async def _wait(self, how: str) -> None:
        if how == "never":
            await Blocked()
        if how == "unfollowed-awaited":
            raise ValueError(how)


def test_core_read_after_write() -> None:
    positions = {"a": 1, "b": 2, "c": 3, "d": 4}
    plan = {"a": "done", "b": "never", "c": "unfollowed-at-once", "d": "unfollowed-awaited"}
    answer = ok({"max_stream_id": 1, "_INT_STREAM_POS": positions})
    core = ScriptedCore(
        make_config(1), [answer], position_waiter=CoreWaiter(plan), position_wait_timeout=2.5
    )
    with pytest.raises(PositionWaitTimeoutError) as info:
        without_a_loop(core.call("remove_tag", None, **REMOVE_TAG))
    assert info.value.pending == {"b": 2}
    assert info.value.result == {"max_stream_id": 1}
    assert core.position_timeouts == [2.5]
    # An answer from this very instance is its own write: nothing to wait for.
    core = ScriptedCore(
        make_config(1), [answer], position_waiter=CoreWaiter(plan), instance_name="master"
    )
    assert without_a_loop(core.call("remove_tag", None, **REMOVE_TAG)) == {"max_stream_id": 1}
    assert core.position_timeouts == []


def test_body_collector_bounds_the_answer() -> None:
    collector = BodyCollector(5)
    collector.feed(b"abc")
    collector.feed(b"de")
    assert collector.body() == b"abcde"
    with pytest.raises(AttemptFailed) as info:
        collector.feed(b"f")
    assert info.value.kind == "too_large"
    assert info.value.reason == "the answer is larger than 5 bytes"


def test_the_core_imports_no_event_loop() -> None:
    """synrepl.http is sans-IO: importing it imports neither Twisted, asyncio
    nor aiohttp."""
    import subprocess
    import sys

    code = (
        "import sys, synrepl.http; "
        "print([m for m in ('twisted', 'asyncio', 'aiohttp') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_core_told_its_release_refuses_endpoints_that_release_lacks() -> None:
    """release=1.116.0: remove_pusher (from 1.117) is refused before any
    request, naming the release that added it; 1.117.0 sends it; with no
    release every endpoint of the newest goes."""
    from synrepl.http import EndpointNotInReleaseError
    from synrepl.releases import SynapseRelease

    args = {"user_id": "@u:test", "app_id": "a", "pushkey": "k"}
    old = ScriptedCore(make_config(1), [], release=SynapseRelease.parse("1.116.0"))
    with pytest.raises(EndpointNotInReleaseError) as refused:
        old.prepare("remove_pusher", None, args)
    assert str(refused.value) == "remove_pusher is served from Synapse 1.117.0 on, not by 1.116.0"
    assert (refused.value.endpoint, refused.value.release) == ("remove_pusher", "1.116.0")
    assert old.attempts == []
    new = ScriptedCore(make_config(1), [], release=SynapseRelease.parse("1.117.0"))
    assert new.prepare("remove_pusher", None, args).url.endswith("/remove_pusher/%40u%3Atest")
    assert ScriptedCore(make_config(1), []).prepare("remove_pusher", None, args)


def test_a_core_learns_each_instance_release_from_its_server_header() -> None:
    """An answer's ``Server: Synapse/1.116.0`` says what that instance runs:
    its endpoints of later releases are then refused before any request,
    while another instance (not heard from) is still called; a 404 from an
    instance whose release lacks the endpoint says so, instead of "not
    found"."""
    from synrepl.http import EndpointNotInReleaseError, HttpReplicationError
    from synrepl.releases import SynapseRelease

    old_server = (("Server", "Synapse/1.116.0"),)
    args = {"user_id": "@u:test", "app_id": "a", "pushkey": "k"}
    core = ScriptedCore(
        make_config(1, instance_map={"worker1": {"host": "127.0.0.1", "port": 2}}),
        [
            HttpAnswer(200, "OK", b"{}", old_server),
            HttpAnswer(404, "Not Found", b'{"errcode": "M_UNRECOGNIZED"}', old_server),
        ],
    )
    assert core.releases_seen == {}
    without_a_loop(
        core.call(
            "copy_push_rules",
            "master",
            user_id="@u:test",
            old_room_id="!o:test",
            new_room_id="!n:test",
        )
    )
    assert core.releases_seen == {"master": SynapseRelease(1, 116, 0)}
    with pytest.raises(
        EndpointNotInReleaseError, match=r"from Synapse 1\.117\.0 on, not by 1\.116\.0"
    ):
        core.prepare("remove_pusher", "master", args)
    assert core.prepare("remove_pusher", "worker1", args).instance == "worker1"
    with pytest.raises(EndpointNotInReleaseError) as refused:
        without_a_loop(core.call("remove_pusher", "worker1", **args))
    assert refused.value.release == "1.116.0"
    assert core.releases_seen["worker1"] == SynapseRelease(1, 116, 0)
    # A 404 from a release that has the endpoint stays an HTTP error.
    newer = ScriptedCore(
        make_config(1),
        [HttpAnswer(404, "Not Found", b"{}", (("Server", "Synapse/1.163.2"),))],
    )
    with pytest.raises(HttpReplicationError):
        without_a_loop(newer.call("remove_pusher", "master", **args))
