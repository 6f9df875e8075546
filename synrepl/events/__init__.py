"""Full events for observers: what the replication rows leave out.

An ``events`` row names an event; its sender and content live only in
Synapse's database.  This package fetches them, in batches, from Synapse's
database read-only (:class:`PostgresEventSource`, :class:`SqliteEventSource`)
or, failing that, from the admin API (:class:`AdminApiEventSource`);
filters rows before anything is fetched (:class:`EventFilter`); and decides,
without I/O, how a batch is retried (:class:`EventFetch`).

Sources are blocking: the client runs them in a worker thread.
"""

from synrepl.events._admin import AdminApiEventSource
from synrepl.events._config import event_source_from_config
from synrepl.events._errors import EventSourceError, EventSourceUnavailable
from synrepl.events._fetch import (
    Done,
    EventFetch,
    EventFetchPolicy,
    EventFetchStateError,
    EventFetchStats,
    Fetch,
    FetchStep,
    Wait,
)
from synrepl.events._filter import EventFilter
from synrepl.events._model import (
    EventsReceived,
    FrozenDict,
    FullEvent,
    MissingEvent,
    freeze,
    thaw,
)
from synrepl.events._postgres import PostgresEventSource
from synrepl.events._redaction import redacted_content
from synrepl.events._source import EventSource
from synrepl.events._sqlite import SqliteEventSource

__all__ = (
    "FullEvent",
    "MissingEvent",
    "EventsReceived",
    "FrozenDict",
    "freeze",
    "thaw",
    "redacted_content",
    "EventSource",
    "EventSourceError",
    "EventSourceUnavailable",
    "PostgresEventSource",
    "SqliteEventSource",
    "AdminApiEventSource",
    "event_source_from_config",
    "EventFilter",
    "EventFetchPolicy",
    "EventFetch",
    "Fetch",
    "Wait",
    "Done",
    "FetchStep",
    "EventFetchStats",
    "EventFetchStateError",
)
