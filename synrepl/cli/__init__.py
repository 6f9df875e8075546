"""The ``synrepl`` command: watch, positions, doctor, catchup, top and demo.

Installed as the ``synrepl`` console script; ``python -m synrepl.cli`` is
the same.  See ``docs/cli.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

__all__ = ("main",)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the ``synrepl`` command with ``argv`` (default: ``sys.argv[1:]``)."""
    from synrepl.cli._main import main as _main

    _main(argv)
