"""``python -m benchmarks.budget``: :func:`benchmarks.budget.cli.main`."""

from .cli import main

raise SystemExit(main())
