"""synrepl: join a Synapse cluster's replication as a first-class member.

The core (this package minus ``synrepl.twisted``) is pure: it parses and
encodes replication commands, types stream rows and keeps stream positions
without doing any I/O.
"""

from synrepl.commands import (
    COMMAND_TYPES,
    AnyCommand,
    CancelTaskCommand,
    ClearUserSyncCommand,
    Command,
    Dialect,
    ErrorCommand,
    FederationAckCommand,
    LockReleasedCommand,
    NameCommand,
    NewActiveTaskCommand,
    PingCommand,
    PositionCommand,
    RdataCommand,
    RemoteServerUpCommand,
    ReplicateCommand,
    SelectiveParser,
    ServerCommand,
    UserIpCommand,
    UserSyncCommand,
    channel_for,
    encode,
    parse_line,
)
from synrepl.errors import (
    ConfigError,
    EncodeError,
    MalformedCommandError,
    MalformedRowError,
    ProtocolError,
    SynreplError,
    UnknownCommandError,
)
from synrepl.positions import StreamPositions

__version__ = "0.1.0.dev0"

__all__ = (
    "parse_line",
    "SelectiveParser",
    "encode",
    "channel_for",
    "Dialect",
    "Command",
    "AnyCommand",
    "COMMAND_TYPES",
    "RdataCommand",
    "PositionCommand",
    "ReplicateCommand",
    "UserSyncCommand",
    "ClearUserSyncCommand",
    "FederationAckCommand",
    "UserIpCommand",
    "RemoteServerUpCommand",
    "LockReleasedCommand",
    "NewActiveTaskCommand",
    "CancelTaskCommand",
    "PingCommand",
    "ErrorCommand",
    "NameCommand",
    "ServerCommand",
    "StreamPositions",
    "SynreplError",
    "ProtocolError",
    "MalformedCommandError",
    "UnknownCommandError",
    "MalformedRowError",
    "EncodeError",
    "ConfigError",
)
