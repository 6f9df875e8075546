"""When to retry a failed replication request, and after how long.

Synapse retries a request that timed out forever, one second apart, and one
that could not connect (or whose host did not resolve) with exponential
backoff, 1 s, 2 s, 4 s ... 32 s, giving up after the seventh failure. It
never retries an HTTP error answer. :class:`RetryPolicy` keeps that shape
but bounds everything: timeouts are retried a limited number of times too,
and no delay exceeds ``max_delay``.

Retrying is safe for the endpoints that take a txn_id (Synapse answers a
repeated txn_id from its cache); the others are, like in Synapse, retried
anyway.
"""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = ("FailureKind", "RetryPolicy", "SYNAPSE_CONNECT_RETRY_ATTEMPTS")

#: A failure that may be retried.
FailureKind = Literal["timeout", "connect"]

#: Synapse's ``RETRY_ON_CONNECT_ERROR_ATTEMPTS`` on every 1.163.2 endpoint.
SYNAPSE_CONNECT_RETRY_ATTEMPTS = 5


@attrs.frozen
class RetryPolicy:
    """Bounded retries in Synapse's manner.

    Attributes:
        connect_retries: retries after connection errors (Synapse: 6, that is
            its ``RETRY_ON_CONNECT_ERROR_ATTEMPTS`` + 1).
        connect_base_delay: the first delay after a connection error; each
            further one doubles.
        max_delay: the cap on any delay.
        timeout_retries: retries after timeouts (Synapse: unbounded).
        timeout_delay: the delay after a timeout (Synapse: 1 s).
    """

    connect_retries: int = attrs.field(default=6, validator=attrs.validators.ge(0))
    connect_base_delay: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    max_delay: float = attrs.field(default=32.0, validator=attrs.validators.ge(0))
    timeout_retries: int = attrs.field(default=5, validator=attrs.validators.ge(0))
    timeout_delay: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(connect_retries=0, timeout_retries=0)

    def delay(self, kind: FailureKind, failures: int) -> float | None:
        """How long to wait before the next attempt, or None to give up.

        Args:
            kind: what went wrong this time.
            failures: how many failures of this kind the call has had,
                this one included (1 for the first).
        """
        if kind == "timeout":
            if failures > self.timeout_retries:
                return None
            return min(self.timeout_delay, self.max_delay)
        if failures > self.connect_retries:
            return None
        doubling = 2.0 ** min(failures - 1, 64)
        return min(self.connect_base_delay * doubling, self.max_delay)
