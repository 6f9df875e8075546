"""The asyncio RedisTransport: what only it has, and the core pieces it is built on.

Every behaviour the two transports share (delivery, reconnecting after a
kill, a restart or CLIENT KILL, keepalive against CLIENT PAUSE, refused
AUTH/SELECT/SUBSCRIBE/CLIENT SETNAME, TLS with a client certificate, the
unix socket, bad messages, pausing, stopping while connecting) is tested
on both, against real redis-server processes, in test_redis_transport.py
(the ``[asyncio]`` test ids).  Here: the event-loop side of this adapter
(running outside a loop, tasks left behind, concurrent stops, cancelled
publishes), the pure-Python reader in a live connection, a server that
sends what Redis never would, and the reactor-free pieces of
:mod:`synrepl.connection` and :mod:`synrepl._resp` that both adapters now
share (:class:`TransportState`, :class:`Keepalive`, :func:`tls_settings`,
the RESP reader and encoder).

The tests are plain functions that run their own loop (``asyncio.run``);
pytest-twisted, which the suite uses, calls them from a reactor callback,
where no asyncio loop is running.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
from asyncio_helpers import in_own_thread, run_in_new_loop
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_server import RedisServer, free_port, redis_server_available
from test_redis_transport import (
    SHARED,
    AsyncioHarness,
    Harness,
    _encode_resp,
    _issue,
    _make_ca,
    _read_all,
    _resp_values,
    _write,
    scenario,
    unique_channel,
)

import synrepl.asyncio
from synrepl import _resp
from synrepl.asyncio.redis_transport import HIREDIS, NotConnectedError, RedisTransport
from synrepl.config import RedisConfig
from synrepl.connection import (
    PUBLISHER,
    SUBSCRIBER,
    AttemptFailure,
    Keepalive,
    PublishDisabledError,
    RedisTransportError,
    TlsSettings,
    TransportOptions,
    TransportState,
    tls_settings,
)
from synrepl.errors import ConfigError, EncodeError

LOGGER = "synrepl.redis"


@pytest.fixture
def harness() -> Harness:
    """The asyncio flavour only (test_redis_transport.py runs both)."""
    return AsyncioHarness()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    if not redis_server_available():
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path) as s:
        yield s


@pytest.fixture
def shared() -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    yield client
    client.close()


def _quiet(config: RedisConfig = SHARED, channels: Any = ("x",), **kwargs: Any) -> RedisTransport:
    return RedisTransport(
        config,
        channels,
        on_line=lambda c, m: None,
        on_subscribed=lambda: None,
        on_connection_lost=lambda: None,
        **kwargs,
    )


# --- the package --------------------------------------------------------------------


def test_the_package_exports_the_transport() -> None:
    assert synrepl.asyncio.RedisTransport is RedisTransport
    assert "RedisTransport" in synrepl.asyncio.__all__


def test_the_asyncio_transport_imports_no_twisted() -> None:
    """The asyncio adapter stands on the core alone: no Twisted, no txredisapi."""
    code = (
        "import sys, synrepl.asyncio.redis_transport\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('twisted', 'txredisapi')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the event loop ---------------------------------------------------------------------


@in_own_thread
def test_start_outside_a_running_loop_is_refused_clearly() -> None:
    """start() needs the running loop: called outside one it says so, and
    the transport can still be started from inside one."""
    transport = _quiet(channels=[unique_channel()])
    with pytest.raises(RuntimeError, match="asyncio event loop"):
        transport.start()

    async def later() -> None:
        transport.start()
        await transport.stop()

    run_in_new_loop(later())


@scenario
async def test_stop_leaves_no_task_behind(harness: Harness, shared: redis.Redis) -> None:
    """After stop() (called twice at once: both wait for the same close)
    no task of the transport is left, and on_connection_lost ran once."""
    before = asyncio.all_tasks()
    transport, rec = harness.make(SHARED, [unique_channel()], keepalive_interval=0.05)
    await harness.started(transport)
    await harness.sleep(0.2)  # a few keepalive rounds
    assert len(asyncio.all_tasks() - before) == 2  # one loop per link
    await asyncio.gather(transport.stop(), transport.stop())
    assert rec.events == ["subscribed", "lost"]
    assert asyncio.all_tasks() - before == set()


@scenario
async def test_a_cancelled_publish_does_not_shift_the_answers(
    harness: Harness, shared: redis.Redis
) -> None:
    """A caller that gives up on a publish does not get, nor leave behind,
    an answer that belongs to another command."""
    base = unique_channel()
    transport, rec = harness.make(SHARED, [base])
    await harness.started(transport)
    given_up = asyncio.ensure_future(transport.publish(base, "PING 1"))
    await asyncio.sleep(0)  # sent, not answered yet
    given_up.cancel()
    assert await transport.publish(f"{base}/nobody", "PING 2") == 0
    assert await transport.publish(base, "PING 3") == 1
    await harness.wait_for(lambda: len(rec.lines) == 2, "two lines")
    assert [line for _, line in rec.lines] == ["PING 1", "PING 3"]


@scenario
async def test_publish_errors_are_raised_when_awaited(harness: Harness) -> None:
    """publish() is a coroutine function: its errors come when it is
    awaited; nothing is sent."""
    transport, _ = harness.make(SHARED, [unique_channel()], publish_enabled=False)
    pending = transport.publish("x", "PING 1")
    with pytest.raises(PublishDisabledError):
        await pending
    transport, _ = harness.make(SHARED, [unique_channel()])
    with pytest.raises(EncodeError):
        await transport.publish("x", "a\nb")
    with pytest.raises(NotConnectedError):
        await transport.publish("x", "PING 1")


@scenario
async def test_publish_refused_by_redis(harness: Harness, server: RedisServer) -> None:
    """Redis refusing PUBLISH (an ACL) is a RedisTransportError with
    Redis's reason; the connection stays and the failure is counted."""
    control = server.client()
    control.execute_command("ACL", "SETUSER", "nopub", "on", ">pw", "~*", "&*", "+@all", "-publish")
    transport, _ = harness.make(server.redis_config(username="nopub", password="pw"), ["hs"])
    await harness.started(transport)
    with pytest.raises(RedisTransportError, match="Redis refused PUBLISH: NOPERM"):
        await transport.publish("hs", "PING 1")
    assert transport.publisher_ready
    assert transport.stats.publish_failures == 1


# --- without hiredis ---------------------------------------------------------------------


@pytest.fixture
def python_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections made from now read with synrepl's own reader, as when
    hiredis is not installed (it is, here; uninstalling it is not an option)."""
    monkeypatch.setattr(_resp, "HIREDIS", False)


@scenario
async def test_the_python_reader_in_a_live_connection(
    harness: Harness, shared: redis.Redis, python_reader: None
) -> None:
    """Without hiredis: big messages split over many reads, bad and blank
    ones, pausing between two replies, and PUBLISH answers all work."""
    base = unique_channel()
    transport, rec = harness.make(SHARED, [base])
    assert transport.parser == "python"
    await harness.started(transport)
    big = "RDATA events master 1 " + "x" * 1_000_000
    shared.publish(base, big)
    shared.publish(base, b"\xff")
    shared.publish(base, " ")
    rec.on_line_hook = lambda channel, line: transport.pause_reading()
    for i in range(3):
        shared.publish(base, f"PING {i}")
    await harness.wait_for(lambda: len(rec.lines) == 1, "the big line")
    await harness.sleep(0.1)
    assert rec.lines == [(base, big)]
    rec.on_line_hook = None
    transport.resume_reading()
    await harness.wait_for(lambda: len(rec.lines) == 4, "every line")
    assert [line for _, line in rec.lines[1:]] == ["PING 0", "PING 1", "PING 2"]
    assert (transport.stats.undecodable_messages, transport.stats.blank_messages) == (1, 1)
    assert await transport.publish(base, "PING 3") == 1


# --- a server that is not quite Redis -------------------------------------------------------


@pytest.mark.parametrize("use_hiredis", [True, False], ids=["hiredis", "python"])
@pytest.mark.parametrize(
    ("greeting", "reason"),
    [
        (b"?what\r\n", "Redis sent an unreadable reply"),
        (b"+HELLO\r\n", "Redis sent a reply to no command"),
    ],
    ids=["garbage", "unasked"],
)
def test_a_server_that_sends_what_redis_never_would(
    monkeypatch: pytest.MonkeyPatch, use_hiredis: bool, greeting: bytes, reason: str
) -> None:
    """Bytes that are not RESP, or a reply to nothing, end the connection
    with a reason, and the loop goes on (a fake server: a real Redis never
    does this)."""
    if use_hiredis and not HIREDIS:
        pytest.skip("hiredis is not installed")
    monkeypatch.setattr(_resp, "HIREDIS", use_hiredis)

    async def main() -> None:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(greeting)
            await reader.read(100)
            writer.close()

        fake = await asyncio.start_server(greet, "127.0.0.1", 0)
        port = fake.sockets[0].getsockname()[1]
        failures: list[AttemptFailure] = []
        config = RedisConfig(enabled=True, host="127.0.0.1", port=port)
        transport = _quiet(
            config,
            on_attempt_failed=failures.append,
            publish_enabled=False,
            options=TransportOptions(min_backoff=0.02, max_backoff=0.05),
        )
        transport.start()
        for _ in range(300):
            if len(failures) >= 2:
                break
            await asyncio.sleep(0.01)
        await transport.stop()
        fake.close()
        await fake.wait_closed()
        assert len(failures) >= 2
        assert failures[0].reason.startswith(reason)

    run_in_new_loop(main())


# --- TransportState: the callback contract, without sockets ---------------------------------


class _Clock:
    def seconds(self) -> float:
        return 0.0


class _Calls:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def state(self, *, publish_enabled: bool = True, **options: Any) -> TransportState:
        return TransportState(
            RedisConfig(enabled=True, password=None),
            ["hs", "hs/USER_IP"],
            on_line=lambda channel, line: self.calls.append((channel, line)),
            on_subscribed=lambda: self.calls.append("subscribed"),
            on_connection_lost=lambda: self.calls.append("lost"),
            on_attempt_failed=lambda failure: self.calls.append(failure.role),
            publish_enabled=publish_enabled,
            options=TransportOptions(**options),
            clock=_Clock(),
        )


def test_on_subscribed_waits_for_both_links_and_messages_do_not() -> None:
    """A message after the subscription but before the publisher is ready is
    delivered at once; on_subscribed comes once both links are ready, once;
    on_connection_lost follows only the subscriber's loss, once."""
    recorded = _Calls()
    state = recorded.state()
    state.subscriber.set_up(0.0)
    state.link_ready()
    state.message(b"hs", b"PING 1")
    assert recorded.calls == [("hs", "PING 1")]
    assert not state.announced
    state.publisher.set_up(0.0)  # type: ignore[union-attr]
    state.link_ready()
    state.link_ready()
    assert recorded.calls == [("hs", "PING 1"), "subscribed"]
    state.publisher.ended(1.0, "lost")  # type: ignore[union-attr]
    state.link_lost(PUBLISHER)
    assert state.announced
    state.subscriber.ended(1.0, "lost")
    state.link_lost(SUBSCRIBER)
    state.link_lost(SUBSCRIBER)
    assert recorded.calls == [("hs", "PING 1"), "subscribed", "lost"]
    state.subscriber.set_up(2.0)
    state.link_ready()  # the publisher is down: not yet
    assert recorded.calls[-1] == "lost"


def test_after_stop_nothing_is_announced_or_handed_up() -> None:
    recorded = _Calls()
    state = recorded.state(publish_enabled=False)
    assert state.stop() is True
    assert state.stop() is False
    state.subscriber.set_up(0.0)
    state.link_ready()
    state.message(b"hs", b"PING 1")
    assert recorded.calls == []
    assert state.stats.messages_received == 1
    assert state.stats.lines_delivered == 0


def test_message_channels_and_kinds() -> None:
    """Subscribed channels come back as the very strings given; any other
    channel is decoded; bad and blank messages are counted, not handed up."""
    recorded = _Calls()
    state = recorded.state()
    state.message(b"hs/USER_IP", b"USER_IP x")
    state.message(b"other\xff", b"PING 1")
    state.message(b"hs", b"\xc3")
    state.message(b"hs", b" \r\t")
    assert recorded.calls == [("hs/USER_IP", "USER_IP x"), ("other\ufffd", "PING 1")]
    assert recorded.calls[0][0] is state.channels[1]
    stats = state.stats
    assert (stats.messages_received, stats.lines_delivered) == (4, 2)
    assert (stats.undecodable_messages, stats.blank_messages) == (1, 1)


def test_publish_rules() -> None:
    recorded = _Calls()
    state = recorded.state()
    assert state.publish_payload("PING é") == "PING é".encode()
    with pytest.raises(EncodeError, match="newline"):
        state.publish_payload("a\nb")
    assert "not connected" in str(state.publisher_unavailable())
    state.stop()
    assert "stopped" in str(state.publisher_unavailable())
    assert state.published(3) == 3
    assert isinstance(state.publish_lost("gone"), NotConnectedError)
    assert str(state.publish_refused("NOPERM")) == "Redis refused PUBLISH: NOPERM"
    assert (state.stats.published, state.stats.publish_failures) == (1, 4)
    with pytest.raises(PublishDisabledError):
        recorded.state(publish_enabled=False).publish_payload("PING 1")


def test_callback_errors_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def explode(*args: object) -> None:
        raise RuntimeError("callback bug")

    state = TransportState(
        RedisConfig(enabled=True),
        ["hs"],
        on_line=explode,
        on_subscribed=explode,
        on_connection_lost=explode,
        on_attempt_failed=explode,
        publish_enabled=False,
        options=TransportOptions(),
        clock=_Clock(),
    )
    state.subscriber.set_up(0.0)
    state.link_ready()
    state.message(b"hs", b"PING 1")
    state.link_lost(SUBSCRIBER)
    state.attempt_failed(AttemptFailure(SUBSCRIBER, "refused", 1))
    assert state.stats.handler_errors == 4
    assert state.last_failure == AttemptFailure(SUBSCRIBER, "refused", 1)
    for name in ("on_subscribed", "on_connection_lost", "on_attempt_failed"):
        assert f"{name} raised" in caplog.text


# --- Keepalive ---------------------------------------------------------------------------------


def test_keepalive_one_ping_at_a_time() -> None:
    pings = Keepalive(TransportOptions(keepalive_interval=5.0, keepalive_timeout=2.0))
    assert (pings.interval, pings.timeout) == (5.0, 2.0)
    assert pings.due() is True  # send, start the timer
    assert pings.due() is False  # one is outstanding
    assert pings.answered() is True  # cancel the timer
    assert pings.due() is True


def test_keepalive_while_paused() -> None:
    """Nothing is sent or timed while paused; an outstanding PING is timed
    afresh on resume; resuming without one starts nothing."""
    pings = Keepalive(TransportOptions())
    assert pings.due()
    assert pings.pause() is True  # cancel its timer
    assert pings.due() is False
    assert pings.pause() is False
    assert pings.resume() is True  # start it again
    assert pings.answered() is True
    assert pings.resume() is False
    paused = Keepalive(TransportOptions(), paused=True)
    assert paused.due() is False
    assert paused.resume() is False
    assert paused.due() is True


@given(st.lists(st.sampled_from(["due", "answered", "pause", "resume"]), max_size=40))
def test_keepalive_timer_is_never_running_without_a_ping_or_while_paused(
    steps: list[str],
) -> None:
    pings = Keepalive(TransportOptions())
    running = False
    for step in steps:
        result = getattr(pings, step)()
        if step in ("due", "resume") and result:
            assert not running
            running = True
        elif step in ("answered", "pause") and result:
            assert running
            running = False
        assert running == pings.timing
        assert not (pings.timing and (pings.paused or not pings.outstanding))


# --- TLS settings --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pems")
    ca_key, ca = _make_ca("synrepl test CA")
    key, cert = _issue(ca_key, ca, "synrepl client", server=False)
    other_key, _ = _issue(ca_key, ca, "other", server=False)
    return {
        "ca": _write(d / "ca.pem", cert=ca),
        "cert": _write(d / "client.pem", cert=cert),
        "key": _write(d / "client.key", key=key),
        "both": _write(d / "both.pem", key=key, cert=cert),
        "other_key": _write(d / "other.key", key=other_key),
        "junk": _write(d / "junk.pem"),
    }


def _tls(**fields: Any) -> RedisConfig:
    return RedisConfig(enabled=True, host="redis.example", use_tls=True, **fields)


def test_tls_settings_read_every_file_once(pems: dict[str, Path]) -> None:
    settings = tls_settings(
        _tls(
            certificate_file=str(pems["cert"]),
            private_key_file=str(pems["key"]),
            ca_file=str(pems["ca"]),
        ),
        verify=True,
    )
    assert isinstance(settings, TlsSettings)
    assert settings.server_name == "redis.example"
    assert len(settings.ca_certificates) == 1 and len(settings.client_chain) == 1
    assert "PRIVATE KEY" not in repr(settings)
    context = settings.ssl_context()
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    both = tls_settings(_tls(certificate_file=str(pems["both"])), verify=True)
    assert both is not None and both.client_key is not None
    assert both.ca_certificates == ()  # the system's CAs


def test_tls_settings_without_tls(caplog: pytest.LogCaptureFixture) -> None:
    assert tls_settings(RedisConfig(enabled=True), verify=True) is None
    assert (
        tls_settings(RedisConfig(enabled=True, path="/run/redis.sock", use_tls=True), True) is None
    )
    assert "use_tls is ignored with a unix socket" in caplog.text


def test_tls_settings_unverified(pems: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """tls_verify=False reads no CA (a missing one is no error) and says
    verification is off."""
    settings = tls_settings(_tls(ca_file="/nonexistent.pem"), verify=False)
    assert settings is not None and settings.ca_certificates == ()
    context = settings.ssl_context()
    assert not context.check_hostname and context.verify_mode == ssl.CERT_NONE
    assert "verification is off" in caplog.text


@pytest.mark.parametrize(
    ("fields", "message", "key"),
    [
        ({"ca_file": "missing"}, "cannot read", "ca_file"),
        ({"ca_file": "junk"}, "no PEM certificate", "ca_file"),
        ({"ca_path": "ca"}, "is not a directory", "ca_path"),
        ({"certificate_file": "junk"}, "no PEM certificate", "certificate_file"),
        ({"certificate_file": "cert"}, "no readable private key", "certificate_file"),
        (
            {"certificate_file": "cert", "private_key_file": "other_key"},
            "no readable private key",
            "private_key_file",
        ),
        ({"private_key_file": "key"}, "needs certificate_file", "private_key_file"),
    ],
)
def test_tls_settings_refuse_bad_files(
    pems: dict[str, Path], tmp_path: Path, fields: dict[str, str], message: str, key: str
) -> None:
    paths = {name: str(pems.get(value, tmp_path / value)) for name, value in fields.items()}
    with pytest.raises(ConfigError, match=message) as info:
        tls_settings(_tls(**paths), verify=True)
    assert info.value.path == ("redis", key)
    assert "BEGIN" not in str(info.value)


def test_tls_settings_ca_path_skips_what_is_not_a_certificate(
    pems: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "README").write_text("not a certificate")
    (tmp_path / "ca.pem").write_bytes(pems["ca"].read_bytes())
    settings = tls_settings(_tls(ca_path=str(tmp_path)), verify=True)
    assert settings is not None and len(settings.ca_certificates) == 1
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(ConfigError, match="no readable PEM certificate"):
        tls_settings(_tls(ca_path=str(tmp_path)), verify=True)


# --- RESP ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not HIREDIS, reason="compares with hiredis")
@settings(max_examples=200, deadline=None)
@given(values=st.lists(_resp_values(), min_size=1, max_size=6), data=st.data())
def test_the_core_python_reader_matches_hiredis(values: list[Any], data: st.DataObject) -> None:
    """synrepl._resp.PythonReader returns what hiredis returns (with the
    same error class), however the bytes are split."""
    wire = b"".join(_encode_resp(v) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    expected = _read_all(hiredis.Reader(replyError=_resp.ReplyError), [wire])
    assert _read_all(_resp.PythonReader(), chunks) == expected
    assert _read_all(_resp.make_reader(use_hiredis=False), chunks) == expected


@given(st.lists(st.one_of(st.binary(max_size=30), st.text(max_size=30), st.integers()), min_size=1))
def test_encode_command_is_read_back_as_sent(args: list[Any]) -> None:
    reader = _resp.PythonReader()
    reader.feed(_resp.encode_command(*args))
    expected = [
        a if isinstance(a, bytes) else str(a).encode() if isinstance(a, int) else a.encode()
        for a in args
    ]
    assert reader.gets() == expected
    assert reader.gets() is False


def test_encode_command_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="float"):
        _resp.encode_command("SET", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        _resp.encode_command("SET", True)


def test_the_python_reader_refuses_what_is_not_resp() -> None:
    for wire in (b"?x\r\n", b"$abc\r\n", b"*1\r\n:x\r\n"):
        reader = _resp.PythonReader()
        reader.feed(wire)
        with pytest.raises(_resp.RespProtocolError):
            reader.gets()


def test_pubsub_pushes_are_told_from_answers() -> None:
    assert _resp.pubsub_push([b"message", b"hs", b"PING 1"]) == (b"message", b"hs", b"PING 1")
    assert _resp.pubsub_push([b"subscribe", b"hs", 1]) == (b"subscribe", b"hs", 1)
    assert _resp.pubsub_push(["message", "hs", "x"]) == (b"message", "hs", "x")
    assert _resp.pubsub_push([b"pong", b""]) is None  # PING on a subscribed connection
    assert _resp.pubsub_push([b"unsubscribe", b"hs", 0]) is None
    assert _resp.pubsub_push(b"OK") is None


def test_subscription_confirmed_once_every_channel_is() -> None:
    subscription = _resp.Subscription(["a", "é"])
    assert subscription.command == _resp.encode_command("SUBSCRIBE", "a", "é")
    assert subscription.confirmed(b"a") is False
    assert subscription.confirmed(b"other") is False
    assert subscription.confirmed("é") is True


def test_log_lines_name_the_transport(caplog: pytest.LogCaptureFixture) -> None:
    """The asyncio transport logs on the same logger as the Twisted one."""
    caplog.set_level(logging.INFO, LOGGER)
    port = free_port()

    async def main() -> None:
        transport = _quiet(RedisConfig(enabled=True, host="127.0.0.1", port=port))
        transport.start()
        await asyncio.sleep(0.05)
        await transport.stop()

    run_in_new_loop(main())
    assert f"cannot connect to 127.0.0.1:{port}" in caplog.text
    assert all(r.name == LOGGER for r in caplog.records)
