"""Processes for ``synrepl conformance`` to judge: one that keeps every rule,
and one per rule that breaks just that rule.

Run as ``python conformance_subjects.py PORT CHANNEL MODE``.  A subject
speaks RESP on plain sockets (hiredis parses), so that what it sends is
exactly what its mode says: redis-py's pub/sub would resubscribe by itself
after a lost connection, without a REPLICATE.  It reconnects 0.3 s after
losing either of its connections, like a worker, and says what its mode
says on every connection (a kill may cut a connection short).
"""

from __future__ import annotations

import select
import socket
import sys
import time
from typing import Any

import hiredis

from synrepl.commands import parse_line
from synrepl.conformance import RULES
from synrepl.errors import ProtocolError

GOOD = "good"
#: mode -> the rule the subject breaks (GOOD breaks none).
MODES = (GOOD, *RULES)
INSTANCE = "subject1"


class Lost(Exception):
    """One of the subject's connections ended."""


class Connection:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.reader = hiredis.Reader()

    def send(self, *args: str) -> None:
        out = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        try:
            self.sock.sendall(b"".join(out))
        except OSError as e:
            raise Lost() from e

    def reply(self, timeout: float | None = 5) -> Any:
        """The next reply; False when none came within ``timeout``."""
        while True:
            got = self.reader.gets()
            if got is not False:
                return got
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return False
            try:
                data = self.sock.recv(65536)
            except OSError as e:
                raise Lost() from e
            if not data:
                raise Lost()
            self.reader.feed(data)

    def call(self, *args: str) -> Any:
        self.send(*args)
        got = self.reply()
        if got is False or isinstance(got, hiredis.ReplyError):
            raise Lost()
        return got

    def close(self) -> None:
        self.sock.close()


def session(port: int, channel: str, mode: str) -> None:
    """One life of the subject's two connections, until one is lost."""
    pub, sub = Connection(port), Connection(port)
    try:
        if mode == "replicate-after-subscribe":
            pub.call("PUBLISH", channel, "REPLICATE")
        sub.call("SUBSCRIBE", channel)
        if mode != "replicate-on-subscribe":
            pub.call("PUBLISH", channel, "REPLICATE")
        say = {
            GOOD: [f"USER_SYNC {INSTANCE} @a:test DEV start 1"],
            "well-formed": ["USER_SYNC only three"],
            "worker-commands": [f"POSITION events {INSTANCE} 1 2"],
            "user-sync-pairing": [f"USER_SYNC {INSTANCE} @a:test DEV end 1"],
            "federation-ack-not-ahead": [f"FEDERATION_ACK {INSTANCE} 999"],
        }.get(mode, [])
        for line in say:
            pub.call("PUBLISH", channel, line)
        if mode == GOOD:
            user_ip = '["syt_x","10.0.0.1","ua","DEV",1]'
            pub.call("PUBLISH", f"{channel}/USER_IP", f"USER_IP @a:test {user_ip}")
            pub.call("PUBLISH", channel, f"USER_SYNC {INSTANCE} @a:test DEV end 2")
        while True:
            message = sub.reply(timeout=0.1)
            pub.call("PING")
            if message is False or message[0] != b"message":
                continue
            line = message[2].decode("utf-8", "replace")
            if mode == "survives-garbage" and _garbage(line):
                raise Lost()
    finally:
        pub.close()
        sub.close()


def _garbage(line: str) -> bool:
    try:
        parse_line(line)
    except ProtocolError:
        return True
    return False


def main(port: int, channel: str, mode: str) -> None:
    while True:
        try:
            session(port, channel, mode)
        except (Lost, OSError):
            if mode == "resubscribes":
                return
        time.sleep(0.3)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
