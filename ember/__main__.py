"""``python -m ember``: the command line."""

from ember.cli import main

raise SystemExit(main())
