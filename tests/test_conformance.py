"""The conformance rules: each broken by a deliberately broken subscriber and
named, and synrepl's own client, on virtual time, breaking none of them."""

from __future__ import annotations

from typing import Any

from synrepl.commands import FederationAckCommand, encode
from synrepl.conformance import RULES, Conformance
from synrepl.monitor import MonitorEntry
from synrepl.streams import FederationRow
from synrepl.testing.clock import VirtualTime

CHANNEL = "test.local"


def test_a_broken_subscriber_is_named_rule_by_rule() -> None:
    c = Conformance(CHANNEL, replicate_within=2)
    c.published(0.0, CHANNEL, "REPLICATE ")  # before subscribing
    c.subscribed(1.0)  # ...and no REPLICATE after it
    c.published(4.0, CHANNEL, "USER_SYNC w1 @a:test DEV end 5")  # end without start
    c.published(4.1, CHANNEL, "USER_SYNC w2 @a:test DEV start 5")  # another instance
    c.published(4.2, CHANNEL, "RDATA events w1 3 []")  # writes no stream
    c.published(4.3, CHANNEL, 'USER_IP @a:test ["t","1.2.3.4","ua","DEV",1]')  # wrong channel
    c.published(4.4, CHANNEL, "FEDERATION_ACK w1 10")  # nothing sent yet
    c.published(4.5, CHANNEL, "RDATA typing")  # malformed
    c.homeserver_sent(5.0, "\x00garbage")
    c.connection_lost(6.0)  # ...and never back
    breaches = c.finish(9.0)
    assert set(breaches) == set(RULES)
    assert breaches["replicate-after-subscribe"].line == "REPLICATE "
    assert breaches["replicate-on-subscribe"].at == 3.0
    assert breaches["user-sync-pairing"].line == "USER_SYNC w1 @a:test DEV end 5"
    assert "RDATA for events" in breaches["worker-commands"].why
    assert breaches["federation-ack-not-ahead"].why == "acked 10, newest federation row sent: None"
    assert breaches["well-formed"].line == "RDATA typing"
    assert breaches["survives-garbage"].at == 6.0
    assert breaches["resubscribes"].at == 8.0


def test_a_conforming_sequence_breaks_nothing() -> None:
    c = Conformance(CHANNEL, writes=["federation"])
    c.subscribed(0.0)
    c.published(0.1, CHANNEL, "REPLICATE ")
    c.homeserver_sent(0.2, "RDATA federation master 12 " + encode_row())
    c.published(0.3, CHANNEL, encode(FederationAckCommand("w1", 12)))
    c.published(0.4, CHANNEL, "USER_SYNC w1 @a:test DEV start 5")
    c.published(0.5, CHANNEL, "USER_SYNC w1 @a:test DEV end 6")
    c.published(0.6, f"{CHANNEL}/USER_IP", 'USER_IP @a:test ["t","1.2.3.4","ua","DEV",1]')
    c.published(0.7, CHANNEL, "CLEAR_USER_SYNC w1")
    c.homeserver_sent(1.0, "NOT_A_COMMAND at all")
    c.connection_lost(9.0)  # long after the garbage
    c.subscribed(9.5)
    c.published(9.6, CHANNEL, "REPLICATE ")
    assert c.finish(20.0) == {}
    assert all(c.exercised[rule] >= 1 for rule in RULES)


def encode_row() -> str:
    import json

    return json.dumps(FederationRow("typing", {}).to_raw(), separators=(",", ":"))


def test_synrepls_own_client_conforms_across_reconnects_and_garbage() -> None:
    """The Twisted client on virtual time, watched through its transport:
    REPLICATE after each subscription (the first and two reconnects), USER_SYNC
    start/end and CLEAR_USER_SYNC at stop, USER_IP on its channel, garbage
    survived."""
    time = VirtualTime()
    conformance = Conformance(CHANNEL)
    watched: list[Any] = []

    def factory(channels: Any, **callbacks: Any) -> Any:
        on_subscribed = callbacks["on_subscribed"]
        on_lost = callbacks["on_connection_lost"]

        def subscribed() -> None:
            conformance.subscribed(time.clock.seconds())
            on_subscribed()

        def lost() -> None:
            conformance.connection_lost(time.clock.seconds())
            on_lost()

        callbacks.update(on_subscribed=subscribed, on_connection_lost=lost)
        transport = time.redis.connect(channels, **callbacks)
        publish = transport.publish

        def watched_publish(channel: str, line: str) -> Any:
            conformance.published(time.clock.seconds(), channel, line)
            return publish(channel, line)

        transport.publish = watched_publish  # type: ignore[method-assign]
        watched.append(transport)
        return transport

    async def scenario() -> None:
        hs = await time.homeserver(server_name=CHANNEL)
        client = time.client(
            hs, transport_factory=factory, instance_name="w1", extra_channels=["USER_IP"]
        )
        await client.start()
        await client.wait_ready()
        await client.send_user_sync("@a:test", "DEV", True, 1)
        await client.send_user_ip("@a:test", "syt_x", "10.0.0.1", "ua", "DEV", 2)
        for line in ("\xff\x00", "RDATA events master x [", "FUTURE_COMMAND 1"):
            conformance.homeserver_sent(time.clock.seconds(), line)
            await hs.publish_raw(line)
        await time.sleep(10)
        for _ in range(2):
            time.redis.drop_connections()
            await time.sleep(10)
        await client.send_user_sync("@a:test", "DEV2", True, 3)
        await client.send_user_sync("@a:test", "DEV2", False, 4)
        await client.stop()  # DEV still syncing: CLEAR_USER_SYNC
        await hs.stop()

    time.run(scenario())
    assert conformance.finish(time.clock.seconds()) == {}
    assert conformance.exercised["replicate-on-subscribe"] == 3
    assert conformance.exercised["user-sync-pairing"] == 4  # 2 starts, an end, CLEAR at stop


def entry(at: float, client: str, *args: bytes) -> MonitorEntry:
    return MonitorEntry(at, 0, client, args)


def test_monitor_entries_are_judged_per_connection() -> None:
    """What ``synrepl conformance`` feeds: a pattern subscription counts, other
    channels are not the process's business, a lost publishing connection asks
    for no REPLICATE, a lost subscription does, and bytes that are not UTF-8
    are not a line."""
    c = Conformance(CHANNEL, replicate_within=2)
    c.monitored(entry(0.0, "sub:1", b"PSUBSCRIBE", b"subject.*", b"test.*"))
    c.monitored(entry(0.1, "pub:1", b"PUBLISH", CHANNEL.encode(), b"REPLICATE "))
    c.monitored(entry(0.2, "pub:1", b"PUBLISH", b"elsewhere", b"\xff not ours"))
    c.connection_lost(1.0, "pub:1")  # the publisher only: still subscribed
    assert c.subscribed_now
    c.monitored(entry(1.5, "pub:2", b"PUBLISH", CHANNEL.encode(), b"PING 1"))
    assert c.finish(10.0) == {}
    c.connection_lost(11.0, "sub:1", forced=True)
    assert not c.subscribed_now
    c.monitored(entry(11.5, "sub:2", b"SUBSCRIBE", CHANNEL.encode()))
    c.monitored(entry(12.0, "pub:2", b"PUBLISH", CHANNEL.encode(), b"REPLICATE "))
    c.monitored(entry(12.5, "pub:2", b"PUBLISH", f"{CHANNEL}/USER_IP".encode(), b"\xffUSER_IP"))
    breaches = c.finish(20.0)
    assert set(breaches) == {"well-formed"}
    assert breaches["well-formed"].why == "not UTF-8 (invalid start byte at byte 0)"
    assert c.exercised["resubscribes"] == 1


def test_a_watch_that_began_late_does_not_hold_an_earlier_start_against_it() -> None:
    c = Conformance(CHANNEL, watched_from_start=False)
    c.already_subscribed("sub:1")
    c.published(1.0, CHANNEL, "USER_SYNC w1 @a:test DEV end 5")  # its start came before
    assert c.finish(2.0) == {}
    strict = Conformance(CHANNEL)
    strict.subscribed(0.0, "sub:1")
    strict.published(0.5, CHANNEL, "REPLICATE ")
    strict.published(1.0, CHANNEL, "USER_SYNC w1 @a:test DEV end 5")
    assert set(strict.finish(2.0)) == {"user-sync-pairing"}
