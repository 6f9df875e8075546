"""Realistic replication traffic for ``synrepl demo``.

A small homeserver's day in fast-forward: a few rooms with their creation and
joins, then messages, replies and topic changes (events with their state
rows, sharded over two event persisters), typing, read receipts, presence,
to-device messages, account data, device list changes, cache invalidations
and push rule changes from the stream writers; USER_SYNC, USER_IP and
FEDERATION_ACK from a simulated sync worker and federation sender; and now
and then a POSITION from an idle persister.
"""

from __future__ import annotations

import random
import string
import time
from collections.abc import Callable, Sequence

from synrepl.commands import Command, FederationAckCommand, UserIpCommand, UserSyncCommand
from synrepl.sharding import event_persister_for_room
from synrepl.streams import (
    AccountDataRow,
    CachesRow,
    CurrentStateRow,
    DeviceListsRow,
    EventRow,
    PresenceRow,
    PushRulesRow,
    ReceiptsRow,
    Row,
    ToDeviceRow,
    TypingRow,
)
from synrepl.testing.homeserver import FakeHomeserver

__all__ = ("DemoTraffic", "SYNC_WORKER", "FEDERATION_SENDER")

SYNC_WORKER = "synchrotron1"
FEDERATION_SENDER = "federation_sender1"

_ROOMS = ("lobby", "dev", "random")
_USERS = ("alice", "bob", "carol", "dave")
_ID_CHARS = string.ascii_letters + string.digits + "-_"


class DemoTraffic:
    """Writes one realistic action per :meth:`step` to a :class:`FakeHomeserver`.

    Args:
        hs: the simulated homeserver (started).
        persisters: its event persisters, in ``stream_writers.events`` order.
        publish: publishes a worker's command (USER_SYNC, USER_IP, ...).
        rng: the source of randomness (seed it for a repeatable demo).
    """

    def __init__(
        self,
        hs: FakeHomeserver,
        persisters: Sequence[str],
        publish: Callable[[Command], None],
        rng: random.Random,
    ) -> None:
        self._hs = hs
        self._persisters = list(persisters)
        self._publish = publish
        self._rng = rng
        server = hs.server_name
        self.rooms = self._rooms_on_every_persister(server)
        self.users = [f"@{name}:{server}" for name in _USERS]
        self._last_event: dict[str, str] = {}
        self._typing: dict[str, tuple[str, ...]] = {}
        self._fed_token = 0
        self._actions: list[tuple[float, Callable[[], None]]] = [
            (30, self.message),
            (12, self.typing),
            (12, self.receipt),
            (7, self.presence),
            (4, self.to_device),
            (4, self.account_data),
            (3, self.device_lists),
            (6, self.caches),
            (4, self.topic),
            (2, self.push_rules),
            (5, self.user_sync),
            (4, self.user_ip),
            (2, self.federation_ack),
            (3, self.idle_position),
        ]

    # --- helpers -----------------------------------------------------------------

    def _rooms_on_every_persister(self, server: str) -> list[str]:
        """Room IDs such that every event persister owns at least one room."""
        while True:
            rooms = [f"!{self._id(18)}:{server}" for _ in _ROOMS]
            owners = {event_persister_for_room(room, self._persisters) for room in rooms}
            if len(owners) == min(len(self._persisters), len(rooms)):
                return rooms

    def _id(self, n: int) -> str:
        return "".join(self._rng.choice(_ID_CHARS) for _ in range(n))

    def _event_id(self) -> str:
        return "$" + self._id(43)

    @staticmethod
    def _now_ms() -> int:
        return int(time.time() * 1000)

    def _persister(self, room: str) -> str:
        return event_persister_for_room(room, self._persisters)

    def _write_event(self, room: str, rows: Sequence[Row]) -> None:
        self._hs.write("events", list(rows), writer=self._persister(room))

    def _event(
        self,
        room: str,
        type_: str,
        *,
        state_key: str | None = None,
        membership: str | None = None,
        relates_to: str | None = None,
    ) -> EventRow:
        event_id = self._event_id()
        self._last_event[room] = event_id
        return EventRow(
            event_id, room, type_, state_key, None, relates_to, membership, False, False
        )

    # --- actions ---------------------------------------------------------------------

    def setup(self) -> None:
        """Create the rooms and let everyone join (a burst of state)."""
        for room in self.rooms:
            create = self._event(room, "m.room.create", state_key="")
            self._write_event(
                room, [create, CurrentStateRow(room, "m.room.create", "", create.event_id)]
            )
            for user in self.users:
                join = self._event(room, "m.room.member", state_key=user, membership="join")
                state = CurrentStateRow(room, "m.room.member", user, join.event_id)
                self._write_event(room, [join, state])

    def step(self) -> None:
        """One action, picked by weight."""
        weights = [w for w, _ in self._actions]
        action = self._rng.choices([a for _, a in self._actions], weights=weights)[0]
        action()

    def message(self) -> None:
        room = self._rng.choice(self.rooms)
        reply_to = self._last_event.get(room) if self._rng.random() < 0.2 else None
        self._write_event(room, [self._event(room, "m.room.message", relates_to=reply_to)])

    def topic(self) -> None:
        room = self._rng.choice(self.rooms)
        event = self._event(room, "m.room.topic", state_key="")
        self._write_event(room, [event, CurrentStateRow(room, "m.room.topic", "", event.event_id)])

    def typing(self) -> None:
        room = self._rng.choice(self.rooms)
        typing = () if self._typing.get(room) else (self._rng.choice(self.users),)
        self._typing[room] = typing
        self._hs.write("typing", [TypingRow(room, typing)])

    def receipt(self) -> None:
        room = self._rng.choice(self.rooms)
        event_id = self._last_event.get(room)
        if event_id is None:
            return self.message()
        user = self._rng.choice(self.users)
        row = ReceiptsRow(room, "m.read", user, event_id, None, {"ts": self._now_ms()})
        self._hs.write("receipts", [row])
        return None

    def presence(self) -> None:
        user = self._rng.choice(self.users)
        state = self._rng.choice(("online", "online", "unavailable", "offline"))
        now = self._now_ms()
        row = PresenceRow(user, state, now - 1000, now - 60_000, now, None, state == "online")
        self._hs.write("presence", [row])

    def to_device(self) -> None:
        self._hs.write("to_device", [ToDeviceRow(self._rng.choice(self.users))])

    def account_data(self) -> None:
        user = self._rng.choice(self.users)
        if self._rng.random() < 0.5:
            row = AccountDataRow(user, self._rng.choice(self.rooms), "m.fully_read")
        else:
            row = AccountDataRow(user, None, "im.vector.setting.breadcrumbs")
        self._hs.write("account_data", [row])

    def device_lists(self) -> None:
        self._hs.write("device_lists", [DeviceListsRow(self._rng.choice(self.users), False, False)])

    def caches(self) -> None:
        user = self._rng.choice(self.users)
        func, keys = self._rng.choice(
            (
                ("get_rooms_for_user", (user,)),
                ("get_user_by_id", (user,)),
                ("get_room_summary", (self._rng.choice(self.rooms),)),
                ("get_users_in_room", (self._rng.choice(self.rooms),)),
            )
        )
        writer = self._rng.choice(["master", *self._persisters])
        self._hs.write("caches", [CachesRow(func, keys, self._now_ms())], writer=writer)

    def push_rules(self) -> None:
        self._hs.write("push_rules", [PushRulesRow(self._rng.choice(self.users))])

    def user_sync(self) -> None:
        user = self._rng.choice(self.users)
        device = user.split(":")[0][1:].upper() + "PHONE"
        syncing = self._rng.random() < 0.7
        self._publish(UserSyncCommand(SYNC_WORKER, user, device, syncing, self._now_ms()))

    def user_ip(self) -> None:
        user = self._rng.choice(self.users)
        device = user.split(":")[0][1:].upper() + "PHONE"
        token = "syt_" + self._id(20)  # a made-up access token: watch redacts it
        ip = f"10.0.{self._rng.randint(0, 3)}.{self._rng.randint(2, 250)}"
        agent = self._rng.choice(("Element/1.11.97", "FluffyChat/1.22", "Element X iOS/25.03"))
        self._publish(UserIpCommand(user, token, ip, agent, device, self._now_ms()))

    def federation_ack(self) -> None:
        self._fed_token += self._rng.randint(1, 5)
        self._publish(FederationAckCommand(FEDERATION_SENDER, self._fed_token))

    def idle_position(self) -> None:
        """An idle persister announces it has caught up with the events stream."""
        if len(self._persisters) < 2:
            return
        self._hs.position("events", writer=self._rng.choice(self._persisters))
