#!/usr/bin/env bash
# Create .venv (if missing) and install ist-optim with every extra, torch pinned to the CPU
# wheel by constraints.txt so no CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[all]"
