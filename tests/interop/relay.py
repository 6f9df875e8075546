"""A filtering relay between Synapse's Redis and a private one.

Every line Synapse's processes publish on the channel is published again on
the private Redis, unless ``drop(line)`` says no: those lines are kept in
:attr:`FilteringRelay.dropped`, so a test knows exactly what its subscriber
never saw.  Lines published on the private Redis by anyone else (the
REPLICATE of an audit) go the other way, so Synapse answers them.  The relay
knows its own republished lines when they come back and does not send them
again (no echo loop).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis


class FilteringRelay:
    def __init__(
        self, upstream_port: int, private_port: int, channel: str, drop: Callable[[str], bool]
    ) -> None:
        self._channel = channel
        self._drop = drop
        self._upstream = redis.Redis(host="127.0.0.1", port=upstream_port, socket_timeout=5)
        self._private = redis.Redis(host="127.0.0.1", port=private_port, socket_timeout=5)
        self._lock = threading.Lock()
        self._republished: Counter[str] = Counter()
        self._stop = threading.Event()
        self.dropped: list[str] = []
        self.relayed_back: list[str] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> FilteringRelay:
        up = self._subscribed(self._upstream)
        down = self._subscribed(self._private)
        for name, pubsub, handle in (("up", up, self._from_synapse), ("down", down, self._back)):
            thread = threading.Thread(
                target=self._run, args=(pubsub, handle), name=f"relay-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _subscribed(self, client: redis.Redis) -> Any:
        pubsub = client.pubsub()
        pubsub.subscribe(self._channel)
        deadline = time.monotonic() + 10
        while True:
            msg = pubsub.get_message(ignore_subscribe_messages=False, timeout=1)
            if msg is not None and msg["type"] == "subscribe":
                return pubsub
            if time.monotonic() > deadline:
                raise RuntimeError("relay did not subscribe")

    def _run(self, pubsub: Any, handle: Callable[[str], None]) -> None:
        while not self._stop.is_set():
            msg = pubsub.get_message(timeout=0.2)
            if msg is not None and msg["type"] == "message":
                handle(msg["data"].decode())
        pubsub.close()

    def _from_synapse(self, line: str) -> None:
        if self._drop(line):
            self.dropped.append(line)
            return
        with self._lock:
            self._republished[line] += 1
        self._private.publish(self._channel, line)

    def _back(self, line: str) -> None:
        with self._lock:
            if self._republished[line] > 0:
                self._republished[line] -= 1
                return
        self.relayed_back.append(line)
        self._upstream.publish(self._channel, line)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._upstream.close()
        self._private.close()
