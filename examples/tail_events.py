"""Tail a Synapse cluster's events stream: one JSON object per new event.

    python examples/tail_events.py -c homeserver.yaml [-c worker.yaml]

Prints every ``ev`` row of the events stream as it is persisted, with the
writer and token, and keeps going across Redis restarts without losing or
repeating a row.  The only thing it publishes is REPLICATE (on every
connect), which asks the writers for their positions.
"""

import argparse
import json

from twisted.internet import defer, task

from synrepl.config import load_config
from synrepl.streams import EventRow
from synrepl.twisted.client import ReplicationClient


async def main(reactor, config_paths):
    client = ReplicationClient(reactor, load_config(*config_paths), streams={"events"})

    def print_events(batch):
        for row in batch.rows:
            if isinstance(row, EventRow):
                fields = {"event_id": row.event_id, "room_id": row.room_id, "type": row.type}
                print(
                    json.dumps({**fields, "writer": batch.writer, "token": batch.token}), flush=True
                )

    client.on_rows("events", print_events)
    await client.start()
    await defer.Deferred()  # run until interrupted


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-c", "--config", action="append", required=True, help="Synapse config file"
    )
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args.config)))
