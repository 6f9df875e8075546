"""Export replication to streaming systems: Redis Streams, NATS JetStream, webhooks.

An :class:`Exporter` is a handler of a replication client: it turns each
delivered batch (typed rows, or full events) into JSON messages with stable
ids (:mod:`synrepl.export._messages`), keeps its partition's share
(:class:`Partition`), sends them to a :class:`Sink` and returns once the sink
acknowledged, so the client checkpoints only what the sink has.

Sinks: :class:`~synrepl.export.redis_stream.RedisStreamSink`,
:class:`~synrepl.export.jetstream.JetStreamSink`,
:class:`~synrepl.export.webhook.WebhookSink`, or :func:`sink_from_url`.
The sink contract (ordering, acknowledgement, idempotency) is
:class:`Sink`'s; ``docs/export.md`` has the whole story.  ``synrepl export``
is the command-line exporter.
"""

from synrepl.export._exporter import Exporter, ExportingClient, ExportStats, ExportStopped
from synrepl.export._messages import ExportMessage, messages_of_events, messages_of_rows
from synrepl.export._partition import Handover, HandoverError, Partition, parse_partition
from synrepl.export._sink import Sink, SinkRejected, SinkUnavailable
from synrepl.export._urls import SINK_SCHEMES, sink_from_url

__all__ = (
    "Exporter",
    "ExportStats",
    "ExportStopped",
    "ExportingClient",
    "ExportMessage",
    "messages_of_rows",
    "messages_of_events",
    "Partition",
    "Handover",
    "HandoverError",
    "parse_partition",
    "Sink",
    "SinkUnavailable",
    "SinkRejected",
    "sink_from_url",
    "SINK_SCHEMES",
)
