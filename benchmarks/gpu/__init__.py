"""Every GPU path in one command: ``python -m benchmarks.gpu`` (:mod:`.check`), which
``scripts/gpu-check.sh`` runs."""
