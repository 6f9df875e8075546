"""The ``synrepl`` command: watch, positions, doctor, catchup, top and demo.

Installed as the ``synrepl`` console script; ``python -m synrepl.cli`` is
the same.  See ``docs/cli.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

__all__ = ("main",)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the ``synrepl`` command with ``argv`` (default: ``sys.argv[1:]``).

    ``export`` runs on Twisted's asyncio reactor, installed here before
    anything imports a reactor: its sinks are asyncio libraries.
    """
    import sys

    words = [word for word in (sys.argv[1:] if argv is None else argv) if not word.startswith("-")]
    if words[:1] == ["export"] and "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        asyncioreactor.install()  # type: ignore[no-untyped-call]
    from synrepl.cli._main import main as _main

    _main(argv)
