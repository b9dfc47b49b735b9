"""``python -m benchmarks.compile``: :func:`benchmarks.compile.steps.main`."""

from .steps import main

raise SystemExit(main())
