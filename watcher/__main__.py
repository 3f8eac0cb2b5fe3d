"""`python -m watcher` runs the `loops-watcher` command."""

from watcher.cli import main

raise SystemExit(main())
