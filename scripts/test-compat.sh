#!/usr/bin/env bash
# The declared dependency range is the tested range: one virtual environment per row of
# requirements/compat/<row>.txt (a pip constraints file pinning torch and the Hugging Face
# stack), under .venv-compat/<row>/, each with ist-optim and every extra installed as that
# row pins them; then the test suite in each (offline, 2 processes). Prints one line per
# row (versions; passed, failed, skipped) and records it in compat-results.md (a row run
# again replaces its line).
#   bash scripts/test-compat.sh                  # every row (about 10 minutes a row)
#   bash scripts/test-compat.sh tf457 floor      # some rows
#   bash scripts/test-compat.sh tf457 -- -k trainer   # pytest arguments after --
# A row's environment is rebuilt when its constraints file changes. Rows that pin another
# torch than 2.13.0 (the CPU wheel on disk) download a CUDA build of several GB; it runs
# on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROWS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do ROWS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
PYTEST_ARGS=("$@")
if [ ${#ROWS[@]} -eq 0 ]; then
    for f in requirements/compat/*.txt; do ROWS+=("$(basename "$f" .txt)"); done
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RESULTS=compat-results.md
HEADER="| row | torch | transformers | peft | accelerate | bitsandbytes | trl | passed | failed | skipped |"
# rows run now replace their line; rows not run keep the line of their last run
if [ "$(head -n 1 "$RESULTS" 2>/dev/null)" != "$HEADER" ]; then
    { echo "$HEADER"; echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"; } > "$RESULTS"
fi
record() {  # record ROW LINE: the row's line in $RESULTS, replaced where it was
    grep -v -F "| $1 |" "$RESULTS" > "$RESULTS.tmp"; echo "$2" >> "$RESULTS.tmp"
    mv "$RESULTS.tmp" "$RESULTS"
}
status=0
for row in "${ROWS[@]}"; do
    pins="requirements/compat/$row.txt"
    venv=".venv-compat/$row"
    if [ ! -f "$pins" ]; then echo "no row $row ($pins)"; status=1; continue; fi
    stamp="$(sha256sum "$pins" pyproject.toml | sha256sum | cut -c1-16)"
    if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
        echo "== $row: building $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
        if ! "$venv/bin/python" -m pip install -q -c "$pins" -e ".[all]"; then
            record "$row" "| $row | install failed |"; status=1; continue
        fi
        echo "$stamp" > "$venv/.stamp"
    fi
    versions="$("$venv/bin/python" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
out = []
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl"):
    try:
        out.append(version(name))
    except PackageNotFoundError:
        out.append("-")
print(" | ".join(out))
PY
)"
    echo "== $row: $versions"
    log="$venv/pytest.log"
    # a row that hangs is stopped (and counted failed) after IST_COMPAT_TIMEOUT seconds
    timeout "${IST_COMPAT_TIMEOUT:-3600}" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        -n "${IST_TEST_WORKERS:-2}" "${PYTEST_ARGS[@]}" 2>&1 | tee "$log" | tail -n 3
    rc=${PIPESTATUS[0]}
    summary="$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tail -n 1)"
    count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '[0-9]+' || echo 0; }
    failed=$(( $(count failed) + $(count error) ))
    record "$row" "| $row | $versions | $(count passed) | $failed | $(count skipped) |"
    [ "$rc" -eq 0 ] || status=1
done
cat "$RESULTS"
exit $status
