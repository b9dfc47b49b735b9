#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels that scripts/gpu-check.sh installs offline
# (pip --no-index) on a GPU machine that has no network: bitsandbytes and badam, for that
# machine's Python (PY_VERSION, default 3.12) on x86-64 Linux. Run it here, with network.
# bitsandbytes' wheel (41 MB) holds one library per CUDA/ROCm/XPU version; only the CUDA
# versions matching BNB_KEEP (default cuda13: the GPU machine's torch is built for CUDA
# 13.0) and the CPU one are kept, so the checkout that travels stays small (about 8 MB).
#   bash scripts/gpu-wheels.sh            # then: bash scripts/gpu-check.sh (on the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${PY_VERSION:-3.12}"
BNB_KEEP="${BNB_KEEP:-cuda13}"
PACKAGES=("${BNB:-bitsandbytes==0.50.2}" "${BADAM:-badam==1.4}")
PIP="${PIP:-python3 -m pip}"
mkdir -p .whl
rm -f .whl/bitsandbytes-*.whl .whl/badam-*.whl
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${PACKAGES[@]}"
python3 - "$BNB_KEEP" .whl/bitsandbytes-*.whl <<'PY'
"""Rewrite a bitsandbytes wheel without the native libraries of other platforms (and
without their RECORD lines, so the wheel stays consistent)."""
import os
import re
import sys
import zipfile

keep, path = sys.argv[1], sys.argv[2]
native = re.compile(r"libbitsandbytes_(\w+)\.(so|dll|dylib)$")


def wanted(name: str) -> bool:
    match = native.search(name)
    return match is None or match.group(1) == "cpu" or match.group(1).startswith(keep)


slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if not wanted(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if wanted(l.split(",")[0])) + "\n").encode()
        dst.writestr(info, data)
    kept = [n for n in dst.namelist() if native.search(n)]
os.replace(slim, path)
print(f"{os.path.basename(path)}: kept {', '.join(os.path.basename(n) for n in kept)}; "
      f"{os.path.getsize(path) / 2**20:.1f} MiB")
PY
ls -la .whl
