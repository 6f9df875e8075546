"""A read-only bridge-side observer: one line per message, exactly once, across restarts.

    python examples/bridge_observer.py -c homeserver.yaml [-c worker.yaml] --checkpoint FILE

Prints ``ROOM_ID SENDER: BODY`` for every ``m.room.message`` (flushed as it
goes) and checkpoints to FILE after each line it printed, so a restart, even
after SIGKILL, goes on where it stopped without missing a message (after a
SIGKILL the last batch may print again).  It publishes nothing at all: it
connects each writer from its own traffic, and reads sender and body from
Synapse's database (read-only; the ``database:`` section of homeserver.yaml,
or ``--database``), or with ``--admin-url`` and ``--admin-token-file`` from
the admin API.  SIGINT or SIGTERM stop it cleanly.
"""

import argparse
import sys
from pathlib import Path

from twisted.internet import defer, task

from synrepl.checkpoints import FileCheckpointStore
from synrepl.config import load_config, read_config_files
from synrepl.events import EventFilter, FullEvent, event_source_from_config
from synrepl.twisted.client import ReplicationClient


async def main(reactor, args):
    config = load_config(*args.config)
    token = Path(args.admin_token_file).read_text().strip() if args.admin_token_file else None
    source = event_source_from_config(
        read_config_files(*args.config),
        database=args.database,
        admin_url=args.admin_url,
        admin_token=token,
    )
    client = ReplicationClient(
        reactor,
        config,
        streams={"events"},
        read_only=True,
        checkpoint=FileCheckpointStore(args.checkpoint, server_name=config.server_name),
        seed_from=source,
    )

    def show(batch):
        for event in batch.events:
            if isinstance(event, FullEvent):
                print(
                    f"{event.room_id} {event.sender}: {event.content.get('body', '')}", flush=True
                )
            else:
                print(f"(no content for {event.event_id}: {event.reason})", file=sys.stderr)

    client.on_events(show, source=source, filter=EventFilter(types=["m.room.message"]))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(client.stop()))
    await client.start()
    await client.wait_ready()
    print("ready", file=sys.stderr, flush=True)
    await client.finished()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-c", "--config", action="append", required=True, help="Synapse config file"
    )
    parser.add_argument("--checkpoint", required=True, help="where positions are kept")
    parser.add_argument("--database", help="a PostgreSQL connection string or SQLite path")
    parser.add_argument("--admin-url", help="read events from the admin API at this URL")
    parser.add_argument("--admin-token-file", help="a server admin's access token, in a file")
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parser.parse_args())))
