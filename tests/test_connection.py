"""The Redis connection policy (synrepl.connection), with no reactor and no Redis."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from synrepl import _ratelimit
from synrepl.config import RedisConfig, Secret
from synrepl.connection import (
    BLANK,
    PUBLISHER,
    REASON_LIMIT,
    SUBSCRIBER,
    LinkState,
    LogLine,
    NotConnectedError,
    ReconnectBackoff,
    RedisTransportError,
    RedisTransportStats,
    Role,
    SetupCommand,
    TransportOptions,
    UndecodableMessage,
    channel_name,
    describe_failure,
    message_line,
    redact,
    redis_address,
    setup_sequence,
    subscription_channels,
)
from synrepl.twisted import _ratelimit as twisted_ratelimit


def test_the_core_imports_no_reactor() -> None:
    """synrepl.connection and synrepl._ratelimit load without Twisted or asyncio."""
    code = (
        "import sys, synrepl.connection, synrepl._ratelimit\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('twisted', 'asyncio', 'txredisapi', 'hiredis')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- options -------------------------------------------------------------------


def test_options_defaults() -> None:
    """The defaults RedisTransport always had."""
    options = TransportOptions()
    assert attrs.asdict(options) == {
        "keepalive_interval": 30.0,
        "keepalive_timeout": 10.0,
        "connect_timeout": 10.0,
        "min_backoff": 0.1,
        "max_backoff": 5.0,
        "client_name": None,
        "tls_verify": True,
        "down_log_interval": 60.0,
    }
    assert options.backoff == ReconnectBackoff(0.1, 5.0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.min_backoff = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "field",
    [
        "keepalive_interval",
        "keepalive_timeout",
        "connect_timeout",
        "min_backoff",
        "down_log_interval",
    ],
)
@pytest.mark.parametrize("value", [0, -1.0, math.nan])
def test_options_refuse_non_positive_times(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be more than 0"):
        options: dict[str, Any] = {field: value}
        TransportOptions(**options)


def test_options_refuse_max_backoff_below_min_backoff() -> None:
    with pytest.raises(ValueError, match=r"max_backoff \(1\.0\) must not be below min_backoff"):
        TransportOptions(min_backoff=2.0, max_backoff=1.0)
    assert TransportOptions(min_backoff=2.0, max_backoff=2.0).max_backoff == 2.0


@pytest.mark.parametrize("name", ["", "two words", "tab\there", "new\nline"])
def test_options_refuse_a_client_name_redis_would_not_take(name: str) -> None:
    with pytest.raises(ValueError, match="client_name must be non-empty without spaces"):
        TransportOptions(client_name=name)


# --- backoff ---------------------------------------------------------------------


@given(
    min_delay=st.floats(0.001, 100.0),
    extra=st.floats(0.0, 1000.0),
    failures=st.integers(0, 10_000),
    draw=st.floats(0.0, 1.0, exclude_max=True),
)
def test_backoff_stays_within_its_bounds(
    min_delay: float, extra: float, failures: int, draw: float
) -> None:
    """Each wait is its base shortened by at most half, and the base doubles
    from min_delay up to max_delay."""
    backoff = ReconnectBackoff(min_delay, min_delay + extra, rng=lambda: draw)
    base = backoff.base(failures)
    assert min_delay <= base <= backoff.max_delay
    doubled = backoff.max_delay if failures > 64 else min_delay * 2.0**failures
    assert base == min(backoff.max_delay, doubled)
    delay = backoff.delay(failures)
    assert base / 2 <= delay <= base
    assert backoff.base(failures + 1) >= base


def test_backoff_sequence() -> None:
    """No jitter drawn: 0.1 after a loss, then 0.2, 0.4, ... capped at 1.0;
    the largest draw halves a wait."""
    backoff = ReconnectBackoff(0.1, 1.0, rng=lambda: 0.0)
    assert [backoff.delay(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert ReconnectBackoff(0.1, 1.0, rng=lambda: 0.999).delay(10) == pytest.approx(0.5005)


def test_backoff_validation() -> None:
    with pytest.raises(ValueError, match="min_delay"):
        ReconnectBackoff(0, 1)
    with pytest.raises(ValueError, match="max_delay"):
        ReconnectBackoff(2, 1)


# --- the set-up sequence ------------------------------------------------------------


@given(
    username=st.sampled_from([None, "", "synrepl"]),
    password=st.sampled_from([None, "", "s3cret"]),
    dbid=st.sampled_from([None, 0, 7]),
    client_name=st.sampled_from([None, "worker1"]),
    role=st.sampled_from([SUBSCRIBER, PUBLISHER]),
)
def test_setup_sequence_for_each_option_combination(
    username: str | None,
    password: str | None,
    dbid: int | None,
    client_name: str | None,
    role: Role,
) -> None:
    """AUTH (when there is a password), SELECT (when there is a dbid), CLIENT
    SETNAME (when named), SUBSCRIBE (subscriber only), in that order; only
    CLIENT SETNAME may be refused without failing the attempt; no REPLICATE."""
    redis = RedisConfig(
        enabled=True,
        username=username,
        password=None if password is None else Secret(password),
        dbid=dbid,
    )
    steps = setup_sequence(redis, role, ["hs", "hs/USER_IP", "hs"], client_name)
    expected: list[tuple[Any, ...]] = []
    if password:
        expected.append(("AUTH", username, password) if username else ("AUTH", password))
    if dbid is not None:
        expected.append(("SELECT", dbid))
    if client_name:
        expected.append(("CLIENT", "SETNAME", f"{client_name}-{role[:3]}"))
    if role == SUBSCRIBER:
        expected.append(("SUBSCRIBE", "hs", "hs/USER_IP"))
    assert [step.args for step in steps] == expected
    assert [step.fatal for step in steps] == [step.args[0] != "CLIENT" for step in steps]
    answers = ["subscriptions" if s.args[0] == "SUBSCRIBE" else "reply" for s in steps]
    assert [step.answer for step in steps] == answers
    assert all("REPLICATE" not in step.args for step in steps)
    if password:
        assert password not in repr(steps)
        assert all(password not in step.label for step in steps)


def test_setup_commands_name_themselves_in_errors() -> None:
    redis = RedisConfig(enabled=True, password=Secret("pw"), dbid=3)
    auth, select, setname, subscribe = setup_sequence(redis, SUBSCRIBER, ["hs"], "w")
    assert auth.refusal("WRONGPASS invalid") == "AUTH failed: WRONGPASS invalid"
    assert select.refusal("ERR DB index is out of range") == (
        "SELECT 3 failed: ERR DB index is out of range"
    )
    assert setname.refusal("NOPERM") == "Redis refused CLIENT SETNAME: NOPERM"
    assert subscribe.channels == ("hs",)
    assert setname.channels == ()
    assert repr(auth) == "SetupCommand(label='AUTH', fatal=True, answer='reply')"


def test_subscription_channels() -> None:
    assert subscription_channels(["b", "a", "b"]) == ("b", "a")
    with pytest.raises(TypeError):
        subscription_channels("hs")
    for bad in ([], [""], ["hs", 3]):
        with pytest.raises(ValueError, match="channels"):
            subscription_channels(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels"):
        setup_sequence(RedisConfig(), SUBSCRIBER, [])
    assert setup_sequence(RedisConfig(), PUBLISHER, []) == ()


def test_setup_command_repr_hides_arguments() -> None:
    step = SetupCommand(("AUTH", "hunter2"), "AUTH")
    assert "hunter2" not in repr(step)


# --- received messages -------------------------------------------------------------


def test_message_line() -> None:
    assert message_line(b"POSITION events master 1 2") == "POSITION events master 1 2"
    assert message_line('RDATA x y 1 ["\u00e9"]'.encode()) == 'RDATA x y 1 ["\u00e9"]'
    assert message_line("already text") == "already text"
    assert message_line(bytearray(b" padded ")) == " padded "
    assert message_line(b"") is BLANK
    assert message_line(b" \t\r ") is BLANK
    assert message_line(b"ok \xff\xfe") == UndecodableMessage("invalid start byte", 3, 5)


@given(st.binary(max_size=64))
def test_message_line_is_a_line_exactly_when_utf8_and_not_blank(data: bytes) -> None:
    result = message_line(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        assert result == UndecodableMessage(e.reason, e.start, len(data))
        return
    if text.strip():
        assert result == text
    else:
        assert result is BLANK


def test_channel_name_never_fails() -> None:
    assert channel_name(b"hs/USER_IP") == "hs/USER_IP"
    assert channel_name("hs") == "hs"
    assert channel_name(b"hs\xff") == "hs\ufffd"


# --- failure descriptions ------------------------------------------------------------


def test_describe_failure() -> None:
    """Redis's replies and the transport's own errors read as they are; other
    errors are named by type.  The password goes, the length is bounded."""
    assert describe_failure(ConnectionRefusedError("refused"), None, redis_reply=False) == (
        "ConnectionRefusedError: refused"
    )
    assert describe_failure(Exception("WRONGPASS pw"), "pw", redis_reply=True) == "WRONGPASS ***"
    assert describe_failure(RedisTransportError("AUTH failed: x"), None, redis_reply=False) == (
        "AUTH failed: x"
    )
    assert describe_failure(NotConnectedError(), None, redis_reply=False) == "NotConnectedError"
    assert describe_failure(TimeoutError(), None, redis_reply=False) == (
        "TimeoutError: TimeoutError"
    )
    long = describe_failure(ValueError("x" * 1000), None, redis_reply=False)
    assert len(long) == REASON_LIMIT + 3 and long.endswith("...")


@given(
    password=st.text(st.characters(exclude_characters="*"), min_size=1, max_size=20),
    before=st.text(max_size=400),
    after=st.text(max_size=400),
)
def test_redact_never_leaves_the_password(password: str, before: str, after: str) -> None:
    text = redact(before + password + after + password, password)
    assert password not in text
    assert len(text) <= REASON_LIMIT + 3


def test_redact_without_password() -> None:
    assert redact("plain", None) == "plain"
    assert redact("plain", "") == "plain"


def test_redis_address() -> None:
    assert redis_address(RedisConfig(host="10.0.0.5", port=6380)) == "10.0.0.5:6380"
    assert redis_address(RedisConfig(host="::1", use_tls=True)) == "[::1]:6379 (TLS)"
    assert redis_address(RedisConfig(path="/run/redis.sock", use_tls=True)) == (
        "unix:/run/redis.sock"
    )


# --- one link's state: counting, logging, waiting ------------------------------------


def _state(role: Role = SUBSCRIBER, **options: Any) -> LinkState:
    return LinkState(
        role,
        "127.0.0.1:6379",
        TransportOptions(**options),
        RedisTransportStats(),
        backoff=ReconnectBackoff(0.1, 1.0, rng=lambda: 0.0),
    )


def _text(line: LogLine | None) -> str:
    assert line is not None
    return line.message % line.args


def test_first_connection_after_failed_attempts() -> None:
    """The first failure is a warning, the next ones DEBUG until
    down_log_interval has passed, then one "still cannot connect"; the
    connection, when it comes, is logged once with the count."""
    state = _state(down_log_interval=10.0)
    first = state.ended(0.0, "ConnectionRefusedError: refused")
    assert first.log.level == logging.WARNING
    assert _text(first.log) == (
        "Redis subscriber: cannot connect to 127.0.0.1:6379 "
        "(ConnectionRefusedError: refused); retrying"
    )
    assert first.failure is not None and first.failure.failures == 1
    assert not first.lost
    quiet = [state.ended(t, "refused") for t in (1.0, 2.0, 9.9)]
    assert [e.log.level for e in quiet] == [logging.DEBUG] * 3
    assert _text(quiet[0].log) == "Redis subscriber: attempt 2 failed: refused"
    still = state.ended(10.5, "refused")
    assert still.log.level == logging.WARNING
    assert _text(still.log) == (
        "Redis subscriber: still cannot connect to 127.0.0.1:6379 after 5 attempts over 10 s "
        "(last error: refused)"
    )
    assert state.ended(11.0, "refused").log.level == logging.DEBUG
    assert [e.delay for e in [first, *quiet, still]] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    setup = state.set_up(12.0)
    assert (
        _text(setup.log) == "Redis subscriber: connected to 127.0.0.1:6379 after 6 failed attempts"
    )
    assert setup.log is not None and setup.log.level == logging.INFO
    assert not setup.reconnect
    assert state.stats == RedisTransportStats(connects=1, failed_attempts=6)


def test_first_connection_at_once() -> None:
    state = _state(PUBLISHER)
    setup = state.set_up(0.0)
    assert _text(setup.log) == "Redis publisher: connected to 127.0.0.1:6379"
    assert state.stats == RedisTransportStats(publisher_connects=1)


def test_loss_and_reconnection_are_logged_once_each() -> None:
    """A loss is one warning (its wait the shortest), the failed attempts
    after it stay quiet until down_log_interval after the loss, the
    reconnection is one INFO line with how long it was down."""
    state = _state(down_log_interval=60.0)
    state.set_up(0.0)
    lost = state.ended(100.0, "Connection lost")
    assert lost.lost and lost.failure is None
    assert lost.log.level == logging.WARNING
    assert _text(lost.log) == (
        "Redis subscriber: connection to 127.0.0.1:6379 lost (Connection lost); reconnecting"
    )
    assert lost.delay == pytest.approx(0.1)
    attempts = [state.ended(100.0 + t, "refused") for t in range(1, 60)]
    assert {e.log.level for e in attempts} == {logging.DEBUG}
    assert state.ended(160.0, "refused").log.level == logging.WARNING
    setup = state.set_up(170.0)
    assert setup.reconnect
    assert _text(setup.log) == (
        "Redis subscriber: reconnected to 127.0.0.1:6379 after 70.0 s down (60 failed attempts)"
    )
    assert state.stats == RedisTransportStats(
        connects=2, reconnects=1, connection_losses=1, failed_attempts=60
    )
    assert state.failures == 0
    # The next outage is reported afresh.
    assert state.ended(200.0, "lost again").log.level == logging.WARNING
    assert state.ended(200.5, "refused").log.level == logging.DEBUG


def test_publisher_losses_are_counted_apart() -> None:
    state = _state(PUBLISHER)
    state.set_up(0.0)
    state.ended(1.0, "lost")
    state.set_up(2.0)
    assert state.stats == RedisTransportStats(publisher_connects=2, publisher_losses=1)


def test_stop_counts_and_logs_nothing() -> None:
    state = _state()
    assert state.stopped() is False
    state.set_up(0.0)
    assert state.stopped() is True
    assert not state.ready
    assert state.stats == RedisTransportStats(connects=1)


def test_timeouts() -> None:
    state = _state(connect_timeout=2.5, keepalive_timeout=0.5)
    assert state.setup_timed_out() == "no answer to AUTH/SELECT/SUBSCRIBE within 2.5 s"
    assert state.keepalive_timed_out() == "no answer to PING within 0.5 s"
    assert state.stats.keepalive_timeouts == 1


_events = st.lists(st.tuples(st.sampled_from(["fail", "up"]), st.floats(0.0, 30.0)), max_size=60)


@given(events=_events, interval=st.floats(1.0, 60.0))
def test_the_log_is_bounded_by_state_changes(
    events: list[tuple[str, float]], interval: float
) -> None:
    """Whatever happens, each down period costs at most one warning per
    down_log_interval (plus the first), and each set-up one INFO line."""
    state = _state(down_log_interval=interval)
    now = 0.0
    down_since: float | None = None
    warnings = 0
    for kind, step in events:
        now += step
        if kind == "up":
            if state.ready:
                continue
            setup = state.set_up(now)
            assert setup.log is not None and setup.log.level == logging.INFO
            if down_since is not None:
                assert warnings <= 1 + (now - down_since) / interval
            down_since, warnings = None, 0
        else:
            ended = state.ended(now, "x")
            if down_since is None:
                down_since = now
                assert ended.log.level == logging.WARNING
            if ended.log.level == logging.WARNING:
                warnings += 1
            assert warnings <= 1 + (now - down_since) / interval
            assert 0.05 <= ended.delay <= 1.0


# --- rate-limited warnings ---------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def seconds(self) -> float:
        return self.now


def test_rate_limited_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The first warning of a period is logged, the rest counted and
    mentioned with the next one logged."""
    caplog.set_level(logging.WARNING, "synrepl.test")
    clock = _Clock()
    warning = _ratelimit.RateLimitedWarning(logging.getLogger("synrepl.test"), clock, 10.0)
    for i in range(5):
        clock.now = float(i)
        warning.warning("bad %s", i)
    clock.now = 10.0
    warning.warning("bad %s", "later")
    assert [r.getMessage() for r in caplog.records] == [
        "bad 0",
        "bad later (4 more like this in the last 10 s were not logged)",
    ]


def test_rate_limited_warning_is_re_exported_for_twisted() -> None:
    assert twisted_ratelimit.RateLimitedWarning is _ratelimit.RateLimitedWarning
