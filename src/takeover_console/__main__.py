"""Entry point for ``python -m takeover_console``."""

from takeover_console.cli import main

raise SystemExit(main())
