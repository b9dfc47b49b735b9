"""``python -m benchmarks.memory``: :func:`benchmarks.memory.peaks.main`."""

from .peaks import main

raise SystemExit(main())
