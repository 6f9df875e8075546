"""synrepl for asyncio programs: the ReplicationClient, its Redis connection
pair and its HTTP replication client, all on the shared sans-IO core."""

from synrepl.asyncio.client import (
    ClientCounters,
    DeliveryStoppedError,
    NotReadyError,
    ReadOnlyError,
    ReplicationClient,
)
from synrepl.asyncio.redis_transport import RedisTransport

__all__ = (
    "ReplicationClient",
    "RedisTransport",
    "ClientCounters",
    "DeliveryStoppedError",
    "NotReadyError",
    "ReadOnlyError",
)
