"""Running asyncio code from the unit suite, whose main thread already runs a loop.

The unit suite runs on Twisted's asyncio reactor (setup.cfg), so the main
thread has a running asyncio loop and ``asyncio.run`` there refuses to nest.
Tests that want a loop of their own (the asyncio transport and HTTP client
on their own, with no simulated homeserver) run it on a thread of its own.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from synrepl.testing.asyncio_clock import in_own_thread as run_on_own_thread

_T = TypeVar("_T")


def run_in_new_loop(work: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(work)`` on a fresh thread, with its result or its exception."""
    return in_own_thread(lambda: asyncio.run(work))()


def in_own_thread(test: Callable[..., _T]) -> Callable[..., _T]:
    """Run ``test`` on a thread of its own, where no event loop runs."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> _T:
        return run_on_own_thread(lambda: test(*args, **kwargs), f"test-{test.__name__}")

    return run
