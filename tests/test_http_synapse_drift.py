"""synrepl's endpoint table against the installed Synapse's endpoint classes.

Every check runs Synapse's own code (its classes' attributes, its client-side
payload serializers, its server-side route registration and auth check), so
a Synapse release that adds, removes or changes an endpoint fails here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import pkgutil
import re
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import pytest

synapse = pytest.importorskip("synapse")

from synapse.replication import http as synapse_http
from synapse.replication.http._base import ReplicationEndpoint
from test_http_endpoints import sample_args
from twisted.web.http_headers import Headers

from synrepl.config import Secret
from synrepl.http import ENDPOINTS, SYNAPSE_VERSION, Endpoint, build_request
from synrepl.http.retry import SYNAPSE_CONNECT_RETRY_ATTEMPTS


def _synapse_endpoints() -> dict[str, type[ReplicationEndpoint]]:
    found: dict[str, type[ReplicationEndpoint]] = {}
    for module_info in pkgutil.iter_modules(synapse_http.__path__):
        module = importlib.import_module(f"{synapse_http.__name__}.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, ReplicationEndpoint)
                and cls is not ReplicationEndpoint
                and isinstance(cls.__dict__.get("NAME"), str)
            ):
                found[cls.NAME] = cls
    return found


SYNAPSE_ENDPOINTS = _synapse_endpoints()


def test_synapse_version_is_the_one_checked() -> None:
    """A different Synapse may still pass; this says which one the table names."""
    # synapse.__version__ carries git details when run inside a git checkout;
    # the installed distribution's version is the one that counts.
    installed = importlib.metadata.version("matrix-synapse")
    if installed != SYNAPSE_VERSION:
        pytest.skip(f"table is for Synapse {SYNAPSE_VERSION}, installed {installed}")


def test_same_endpoint_names() -> None:
    missing = sorted(set(SYNAPSE_ENDPOINTS) - set(ENDPOINTS))
    extra = sorted(set(ENDPOINTS) - set(SYNAPSE_ENDPOINTS))
    assert not missing, f"Synapse has endpoints synrepl lacks: {missing}"
    assert not extra, f"synrepl lists endpoints Synapse no longer has: {extra}"


@pytest.mark.parametrize("name", sorted(SYNAPSE_ENDPOINTS))
def test_endpoint_class_attributes_agree(name: str) -> None:
    cls = SYNAPSE_ENDPOINTS[name]
    ours = ENDPOINTS.get(name)
    assert ours is not None, f"{name} is missing from synrepl.http.ENDPOINTS"
    assert ours.synapse_class == cls.__name__
    assert ours.path_args == tuple(cls.PATH_ARGS)
    assert ours.method == cls.METHOD
    assert ours.cache == cls.CACHE
    assert ours.wait_for_streams == cls.WAIT_FOR_STREAMS
    assert ours.retry_on_timeout == cls.RETRY_ON_TIMEOUT
    assert ours.retry_on_connect_error == cls.RETRY_ON_CONNECT_ERROR
    assert cls.RETRY_ON_CONNECT_ERROR_ATTEMPTS == SYNAPSE_CONNECT_RETRY_ATTEMPTS
    assert "instance" not in ours.path_args + tuple(f.name for f in ours.fields)


# --- the client side: what Synapse's serializer sends ----------------------------------

#: Where synrepl's body deliberately differs from what Synapse's client sends.
_EXTRA_FIELDS = {"fed_query": {"origin"}}


def _run(coroutine: Any) -> Any:
    """Run a coroutine that never waits (Synapse's serializers, given no events)."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the serializer waited for something")


def _synapse_kwargs(cls: type[ReplicationEndpoint], ours: Endpoint) -> tuple[dict, dict]:
    """Arguments for Synapse's serializer, and the same values in synrepl's form."""
    from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
    from synapse.types import create_requester

    args = sample_args(ours)
    synapse_kwargs: dict[str, Any] = {}
    for param in inspect.signature(cls._serialize_payload).parameters.values():
        if param.name in ("store", "event_and_contexts", "events_and_context"):
            synapse_kwargs[param.name] = [] if param.name != "store" else None
            args.pop("events", None)
            if "events" in (f.name for f in ours.fields):
                args["events"] = []
        elif param.name == "extra_users":
            synapse_kwargs[param.name] = []
        elif param.name == "requester":
            requester = create_requester("@alice:hs", device_id="DEV")
            synapse_kwargs[param.name] = requester
            field = next((f for f in ours.fields if f.name == "requester"), None)
            if field is not None:  # send_events puts it inside each event instead
                as_string = field.type.name == "string"
                args["requester"] = (
                    requester.user.to_string() if as_string else requester.serialize()
                )
        elif param.name == "room_version":
            synapse_kwargs[param.name] = KNOWN_ROOM_VERSIONS["10"]
            args["room_version"] = "10"
        elif param.name == "ratelimit":
            synapse_kwargs[param.name] = True
        elif param.name in args:
            if param.default is not inspect.Parameter.empty:
                args.pop(param.name)  # leave defaults to both sides
            else:
                synapse_kwargs[param.name] = args[param.name]
        elif param.name == "content":  # taken by Synapse's client but never sent
            synapse_kwargs[param.name] = {}
        else:
            raise AssertionError(f"{ours.name}: Synapse's client takes {param.name!r}")
    return synapse_kwargs, args


@pytest.mark.parametrize("name", sorted(SYNAPSE_ENDPOINTS))
def test_body_is_what_synapse_client_sends(name: str) -> None:
    """Given the same values, synrepl sends the JSON Synapse's own client sends."""
    cls = SYNAPSE_ENDPOINTS[name]
    ours = ENDPOINTS[name]
    synapse_kwargs, args = _synapse_kwargs(cls, ours)
    payload = json.loads(json.dumps(_run(cls._serialize_payload(**synapse_kwargs))))
    request = build_request(ours, args)
    if ours.method == "GET":
        assert request.body is None
        assert urlsplit(request.path).query == urlencode(payload, True)
        return
    assert request.body is not None
    sent = json.loads(request.body)
    for extra in _EXTRA_FIELDS.get(name, ()):
        sent.pop(extra)
    assert sent == payload


# --- the server side: Synapse's route and auth check accept synrepl's requests -------


class _RecordingHttpServer:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str]]] = []

    def register_paths(self, method: str, patterns: Any, callback: Any, name: str) -> None:
        self.routes += [(method, pattern) for pattern in patterns]


@pytest.mark.parametrize("name", sorted(SYNAPSE_ENDPOINTS))
def test_synapse_route_matches_our_path(name: str) -> None:
    """Synapse's own route pattern for the endpoint matches the path synrepl builds,
    and gives back every argument (and the txn_id) unchanged."""
    cls = SYNAPSE_ENDPOINTS[name]
    ours = ENDPOINTS[name]
    server = _RecordingHttpServer()
    cls.register(cls.__new__(cls), server)  # class attributes only, no HomeServer
    ((method, pattern),) = server.routes
    assert method == ours.method
    args = sample_args(ours)
    for field in ours.path:
        if not field.choices:
            args[field.name] = f"{field.name} /:?#%@!ü"  # everything that needs quoting
    request = build_request(ours, args)
    match = pattern.match(urlsplit(request.path).path)
    assert match, f"{request.path} does not match {pattern.pattern}"
    got = {key: unquote(value) for key, value in match.groupdict().items()}
    expected = {arg: args[arg] for arg in ours.path_args}
    if ours.cache:
        expected["txn_id"] = request.txn_id
    assert got == expected


def test_synapse_auth_check_accepts_our_header() -> None:
    secret = "a-Secret_123"
    request = build_request(
        "remove_tag", {"user_id": "u", "room_id": "r", "tag": "t"}, secret=Secret(secret)
    )

    class FakeRequest:
        requestHeaders = Headers(
            {name.encode(): [value.encode()] for name, value in request.header_lines()}
        )

    class FakeEndpoint:
        _replication_secret = secret

    ReplicationEndpoint._check_auth(FakeEndpoint(), FakeRequest())  # type: ignore[arg-type]
    FakeEndpoint._replication_secret = "other"
    with pytest.raises(RuntimeError):
        ReplicationEndpoint._check_auth(FakeEndpoint(), FakeRequest())  # type: ignore[arg-type]
