#!/usr/bin/env bash
# The main job of the README: set up .venv, then train a tiny model with IST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python examples/quickstart.py "$@"
