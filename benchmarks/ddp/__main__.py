"""``torchrun --nproc_per_node N -m benchmarks.ddp``: :func:`benchmarks.ddp.modes.main`."""

from .modes import main

raise SystemExit(main())
