"""``python -m benchmarks.frontier``: :func:`benchmarks.frontier.cli.main`."""

from .cli import main

raise SystemExit(main())
