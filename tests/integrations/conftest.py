"""The axolotl end-to-end tests run only in the axolotl environment, through
``bash scripts/test-integrations.sh`` (which sets IST_AXOLOTL_E2E=1). The main suite
(``pytest`` from the repository root) ignores this folder: nothing here is imported there."""

import os
import sys
from pathlib import Path

if os.environ.get("IST_AXOLOTL_E2E") != "1":
    collect_ignore_glob = ["*.py"]
else:
    sys.path.insert(0, str(Path(__file__).parent))  # fixtures.py
