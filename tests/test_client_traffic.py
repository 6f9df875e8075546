"""The whole client of either adapter against drawn traffic, on virtual
time (Twisted's task.Clock, or asyncio's VirtualEventLoop): whatever the
writers do (interleaved batches, rows never published or published twice,
POSITIONs, lost Redis connections, time passing), every row reaches the
handler exactly once, in order per writer."""

from __future__ import annotations

from typing import Any

from client_helpers import Collector
from hypothesis import HealthCheck, given, settings

from synrepl.testing import strategies as rs
from synrepl.testing.asyncio_clock import AsyncioVirtualTime
from synrepl.testing.clock import VirtualTime
from synrepl.testing.traffic import Traffic


def play(script: Traffic, adapter: str, **client_options: Any) -> None:
    time: Any = VirtualTime() if adapter == "twisted" else AsyncioVirtualTime()

    async def scenario() -> None:
        hs = await time.homeserver(writers=script.writers, writes=script.writes(), page_limit=5)
        client = time.client(hs, streams=script.streams(), **client_options)
        seen = Collector()
        client.on_rows(None, seen)
        await client.start()
        await client.wait_ready(timeout=10)
        expected = await script.play(hs, time)
        last = {pair: rows[-1][0] for pair, rows in expected.items() if rows}
        for _ in range(600):  # a minute of virtual time at most
            positions = client.positions()
            if all(positions.get(s, {}).get(w) == t for (s, w), t in last.items()):
                break
            await time.sleep(0.1)
        assert {pair: seen.rows(*pair) for pair in expected} == expected
        assert {(b.stream, b.writer) for b in seen.batches} <= set(expected)
        await client.stop()
        await hs.stop()

    time.run(scenario())


SLOW_OK = [HealthCheck.too_slow]

# One function per adapter, not parametrize: pytest-twisted wraps a
# hypothesis test's inner function in place, and two parametrized items
# share it, so the second would be wrapped twice.


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_OK)
@given(rs.traffic())
def test_every_row_once_in_order_whatever_the_traffic_twisted(script: Traffic) -> None:
    play(script, "twisted")


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_OK)
@given(rs.traffic())
def test_every_row_once_in_order_whatever_the_traffic_asyncio(script: Traffic) -> None:
    play(script, "asyncio")


@settings(max_examples=30, deadline=None, suppress_health_check=SLOW_OK)
@given(rs.traffic(max_steps=60))
def test_and_with_a_memory_bound_far_below_the_traffic_twisted(script: Traffic) -> None:
    play(script, "twisted", max_pending_rows=4)


@settings(max_examples=30, deadline=None, suppress_health_check=SLOW_OK)
@given(rs.traffic(max_steps=60))
def test_and_with_a_memory_bound_far_below_the_traffic_asyncio(script: Traffic) -> None:
    play(script, "asyncio", max_pending_rows=4)
