"""Code the benchmark scripts share: model building (:mod:`benchkit.models`), data
(:mod:`benchkit.data`: the Shakespeare play split, token blocks, held-out loss) and reports
(:mod:`benchkit.report`: JSONL rows, markdown tables), plus the memory anchors of
``memory_plan.py`` (:mod:`benchkit.memory_anchors`).

The benchmarks are scripts (``python benchmarks/<name>.py``); Python puts the script's
folder first on ``sys.path``, so ``from benchkit.data import split_plays`` and sibling
imports (``from budget_methods import METHODS``) resolve with no path set-up. The tests load
them through ``tests/conftest.py``'s ``load_benchmark``, the one place that adds
``benchmarks/`` to ``sys.path``.
"""

import os

# Nothing is downloaded: the pretrained models come from pip packages (ist-finetune's),
# the others are built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
