"""Held-out loss of fine-tuning methods at equal steps and at equal time on SmolLM2-135M.

``python -m benchmarks.quality`` (:mod:`.heldout`); ``estimators_samplers.sh`` runs its
grid of importance estimators x samplers.
"""
