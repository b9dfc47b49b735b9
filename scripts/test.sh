#!/usr/bin/env bash
# The test command of the README and of CI: set up .venv, then run the whole suite offline,
# in 2 processes (pytest-xdist; IST_TEST_WORKERS=N for another count).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m pytest -q -n "${IST_TEST_WORKERS:-2}" "$@"
