"""Partitions: N exporters share one stream, each room on exactly one of them.

Every partition follows the whole stream with its own checkpoint and keeps
only the messages whose key (the room, by default) hashes to it, the way
Synapse spreads rooms over event persisters.  So the partitions together
export every message exactly once, and a room's messages in order on one
partition.  A message without the key (a row of a stream with no room)
goes where its writer's name hashes: still one partition, in order per writer.

Changing the number of partitions (:class:`Handover`): the new partitions
start from the oldest position any old one had reached, and skip what the
old partition that owned a key had already exported.  Nothing is exported
twice, nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from synrepl.export._messages import ExportMessage
from synrepl.sharding import shard_index

__all__ = ("Partition", "Handover", "HandoverError", "parse_partition")

Positions = Mapping[str, Mapping[str, int]]


class HandoverError(ValueError):
    """The old partitions' checkpoints cannot be handed over (one is missing a
    position another has): starting anyway would skip or repeat messages."""


def _owner(message: ExportMessage, count: int) -> int:
    return shard_index(message.key if message.key is not None else message.writer, count)


@attrs.frozen
class Handover:
    """What the partitions before a change of count had exported.

    Attributes:
        positions: each old partition's checkpoint, in partition order (so
            its length is the old count).
    """

    positions: tuple[Positions, ...] = attrs.field(converter=tuple[Positions, ...])

    def __attrs_post_init__(self) -> None:
        if not self.positions:
            raise HandoverError("a handover needs the checkpoint of every old partition")
        pairs = [{(s, w) for s, ws in p.items() for w in ws} for p in self.positions]
        every = set().union(*pairs)
        for index, have in enumerate(pairs):
            if lacking := sorted(every - have):
                stream, writer = lacking[0]
                raise HandoverError(
                    f"old partition {index} of {len(pairs)} has no position for {stream} "
                    f"from {writer} (others have one): run it until it is ready, stop it "
                    "cleanly, then hand over"
                )

    def start(self) -> dict[str, dict[str, int]]:
        """Where the new partitions start: per stream and writer, the lowest
        position of the old ones."""
        common: dict[str, dict[str, int]] = {}
        for positions in self.positions:
            for stream, writers in positions.items():
                for writer, token in writers.items():
                    have = common.setdefault(stream, {})
                    have[writer] = min(token, have.get(writer, token))
        return common

    def exported(self, message: ExportMessage) -> bool:
        """Whether the old partition owning ``message`` had exported it."""
        old = self.positions[_owner(message, len(self.positions))]
        return message.token <= old.get(message.stream, {}).get(message.writer, -1)


@attrs.frozen
class Partition:
    """Partition ``index`` of ``count`` (0-based).

    Attributes:
        index: this partition, ``0 <= index < count``.
        count: how many partitions share the stream.
        handover: what the partitions before a change of count exported
            (None: no change).
    """

    index: int
    count: int = attrs.field(validator=attrs.validators.ge(1))
    handover: Handover | None = None

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"partition {self.index} of {self.count}: the index must be 0..{self.count - 1}"
            )

    @property
    def name(self) -> str:
        """``partition-I-of-N``: the checkpoint name of this partition."""
        return f"partition-{self.index}-of-{self.count}"

    def keeps(self, message: ExportMessage) -> bool:
        """Whether this partition exports ``message``."""
        if _owner(message, self.count) != self.index:
            return False
        return self.handover is None or not self.handover.exported(message)

    def select(self, messages: Sequence[ExportMessage]) -> list[ExportMessage]:
        """The messages this partition exports, in order."""
        return [m for m in messages if self.keeps(m)]


def parse_partition(text: str) -> tuple[int, int]:
    """``I/N`` (0-based) as ``(I, N)``.

    Raises:
        ValueError: not two integers, or I outside 0..N-1.
    """
    index_text, slash, count_text = text.partition("/")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"a partition is I/N, 0 <= I < N (say 0/3), got {text!r}") from None
    if not slash or count < 1 or not 0 <= index < count:
        raise ValueError(f"a partition is I/N, 0 <= I < N (say 0/3), got {text!r}")
    return index, count
