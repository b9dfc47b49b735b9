"""The axolotl end-to-end tests run only in the axolotl environment, through
``bash scripts/test-integrations.sh`` (which sets IST_AXOLOTL_E2E=1 and uses this folder's
pytest.ini). The main suite (``pytest`` from the repository root) ignores this folder
(``--ignore=tests/integrations`` in pyproject.toml); without the variable, this conftest
also keeps every file here out of a collection that reaches it."""

import os
import sys
from pathlib import Path

if os.environ.get("IST_AXOLOTL_E2E") != "1":
    collect_ignore_glob = ["*.py"]
else:
    sys.path.insert(0, str(Path(__file__).parent))  # fixtures.py
