"""``python -m synrepl ...`` is the ``synrepl`` command (works without PATH set up)."""

from synrepl.cli import main

raise SystemExit(main())
