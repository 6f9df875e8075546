"""``python -m synrepl.cli``: the ``synrepl`` command."""

from synrepl.cli import main

main()
