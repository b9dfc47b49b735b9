"""Code the benchmarks share: model building (:mod:`.models`), data (:mod:`.data`: the
Shakespeare play split, token blocks, held-out loss), result rows and tables
(:mod:`.report`: JSONL rows, markdown tables), the learning-rate sweep and what is left to
run (:mod:`.sweep`), one protocol per report (:mod:`.protocol`), and the memory anchors the
planner is compared with (:mod:`.memory_anchors`).

It reaches ``ist_optim`` through public names only: ``ist_optim``'s, a subpackage's
``__all__`` (``ist_optim.memory``) and the training harness ``ist_optim.cli`` makes public
for this (``tests/benchmarks/test_benchkit.py`` checks it).
"""

import os

# Nothing is downloaded: the pretrained models come from pip packages (ist-finetune's),
# the others are built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
