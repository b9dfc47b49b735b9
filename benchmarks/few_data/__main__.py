"""``python -m benchmarks.few_data``: :func:`benchmarks.few_data.epochs.main`."""

from .epochs import main

raise SystemExit(main())
