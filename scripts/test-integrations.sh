#!/usr/bin/env bash
# The integration tests with the real axolotl (README, docs/axolotl.md): create
# .venv-axolotl/ (axolotl pins its own transformers, peft and trl, older than the main
# environment's), install axolotl from requirements/axolotl.txt with torch pinned to the CPU
# wheel by requirements/axolotl-constraints.txt, install this package into it without
# touching those pins, then run tests/integrations/ (`axolotl train` end to end, on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-axolotl
if [ ! -x "$VENV/bin/axolotl" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -c requirements/axolotl-constraints.txt \
        -r requirements/axolotl.txt
fi
# --no-deps: ist-optim needs only torch, and axolotl's pins must stay as they are
"$VENV/bin/python" -m pip install -q --no-deps -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled AXOLOTL_DO_NOT_TRACK=1
export IST_AXOLOTL_E2E=1
"$VENV/bin/python" -m pytest -c tests/integrations/pytest.ini tests/integrations "$@"
