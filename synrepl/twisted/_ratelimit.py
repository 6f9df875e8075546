"""Moved to :mod:`synrepl._ratelimit` (it needs no reactor); kept for its importers."""

from synrepl._ratelimit import RateLimitedWarning as RateLimitedWarning  # noqa: PLC0414
