"""One configuration per process: its own peak memory, fresh compile caches.

The memory and compile benchmarks run each configuration as ``python -m <module> ...
--run NAME`` from the repository root; the child prints its result row as the last line
of its output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "run_isolated"]

#: The repository root: ``python -m benchmarks...`` runs from there.
ROOT = Path(__file__).resolve().parents[2]


def run_isolated(module: str, argv: list[str], *, tail: int = 3000) -> dict[str, Any] | None:
    """Run ``python -m module *argv`` in a process of its own and return the JSON row it
    printed last; None when it failed (the last ``tail`` characters of its stderr are
    printed, after the run's name: ``argv``'s last word)."""
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(f"{argv[-1]} failed:\n{proc.stderr[-tail:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])
