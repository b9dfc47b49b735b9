"""``python -m benchmarks.gpu``: :func:`benchmarks.gpu.check.main`."""

from .check import main

raise SystemExit(main())
