"""``python -m benchmarks.quality``: :func:`benchmarks.quality.heldout.main`."""

from .heldout import main

raise SystemExit(main())
