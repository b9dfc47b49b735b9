#!/usr/bin/env bash
# The integration tests with the real LLaMA-Factory (README, docs/llamafactory.md): create
# .venv-llamafactory/ (llamafactory pins its own transformers, peft and trl), install it from
# requirements/llamafactory.txt, install this package into it without touching those pins,
# then run tests/llamafactory/ (`ist-llamafactory train cfg.yaml` end to end, on CPU, and
# LLaMA-Factory's own `use_badam` on the same model and data).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-llamafactory
if [ ! -x "$VENV/bin/llamafactory-cli" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -c requirements/llamafactory-constraints.txt \
        -r requirements/llamafactory.txt
fi
# --no-deps: ist-optim needs only torch, and LLaMA-Factory's pins must stay as they are
"$VENV/bin/python" -m pip install -q --no-deps -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled DISABLE_VERSION_CHECK=1
export IST_LLAMAFACTORY_E2E=1
"$VENV/bin/python" -m pytest -c tests/llamafactory/pytest.ini tests/llamafactory "$@"
