"""The LLaMA-Factory end-to-end tests run only in the LLaMA-Factory environment, through
``bash scripts/test-llamafactory.sh`` (which sets IST_LLAMAFACTORY_E2E=1 and uses this
folder's pytest.ini). The main suite ignores this folder (``--ignore=tests/llamafactory``
in pyproject.toml); without the variable this conftest also keeps every file here out of a
collection that reaches it."""

import os
import sys
from pathlib import Path

if os.environ.get("IST_LLAMAFACTORY_E2E") != "1":
    collect_ignore_glob = ["*.py"]
else:  # the tiny model and dataset writers of the axolotl tests
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
