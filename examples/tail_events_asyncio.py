"""Tail a Synapse cluster's events stream from an asyncio program.

    python examples/tail_events_asyncio.py -c homeserver.yaml [-c worker.yaml]

What examples/tail_events.py does, from ``asyncio.run()``, with no Twisted
import of its own: one JSON object per new event, with the writer and token,
across Redis restarts without losing or repeating a row.  Ctrl-C stops it.
"""

import argparse
import asyncio
import json
import signal

from synrepl.asyncio import ReplicationClient
from synrepl.config import load_config
from synrepl.streams import EventRow


async def main(config_paths):
    client = ReplicationClient(load_config(*config_paths), streams={"events"})

    async def print_events(batch):
        for row in batch.rows:
            if isinstance(row, EventRow):
                fields = {"event_id": row.event_id, "room_id": row.room_id, "type": row.type}
                print(
                    json.dumps({**fields, "writer": batch.writer, "token": batch.token}), flush=True
                )

    client.on_rows("events", print_events)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await client.start()
    await stopping.wait()
    await client.stop()
    if client.http is not None:
        await client.http.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-c", "--config", action="append", required=True, help="Synapse config file"
    )
    asyncio.run(main(parser.parse_args().config))
