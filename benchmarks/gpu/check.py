"""Every GPU path in one command: the CUDA tests, then the 7B-shape and budget benchmarks.

Run through ``bash scripts/gpu-check.sh`` (see docs/benchmarks.md, "GPU check"). It needs
only what the GPU machines have (python3 with torch, transformers, peft, accelerate,
pytest, hypothesis) and the wheels carried in ``.whl/`` (bitsandbytes, badam:
``bash scripts/gpu-wheels.sh`` fetches them). Parts, in this order (lightest first, so a
time-out still leaves the results of the earlier ones):

1. ``environment``: python, torch, CUDA, cuDNN, GPU name, memory and driver, package
   versions, git commit.
2. ``wheels``: installs the wheels carried in ``.whl/`` with ``pip install --no-index
   --no-deps --target`` into a temporary folder put first on the children's
   ``PYTHONPATH`` (nothing is downloaded), then checks that every package the check needs
   beyond the image (:data:`NEEDED`) imports.
3. ``pytest-cuda``: ``pytest -m cuda`` over the test files that mark tests ``cuda``, one
   record per test (with the properties a test records, e.g. the measured cuBLAS
   workspaces).
4. ``memory-7b:<config>``: ``python -m benchmarks.memory --preset 7b --device cuda`` for the LoRA
   configurations, one process each.
5. ``budget``: ``python -m benchmarks.budget --device cuda --random-init``: the budget
   benchmark's GPU mode on a random-init model of SmolLM2-135M's shape (no pretrained
   weights travel), the repo's docs as text.
6. ``memory-7b:<config>`` for the full fine-tuning configurations (heaviest last).

Verdicts: every part ends ``passed``, ``failed``, ``timeout`` or ``skipped``; the check
passes only when every part passed (a skipped part, a skipped CUDA test, a budget run over
its budget are failures). Each part has its own time limit, cut to what is left of the
total budget (420 s by default); a part that no longer fits is recorded as skipped (out of
time). ``summary.md`` is written before the first part (every part "not run") and again
after each one, so a check killed from outside still leaves a verdict line per part.

Without a CUDA device (or with ``--dry``) the same parts run in a dry mode on the CPU: the
CUDA tests are collected and must all skip for want of a device, the memory benchmark
runs its ``tiny`` preset, the budget benchmark a tiny random model for two steps, so the
whole check stays exercised in CI (tests/benchmarks/test_gpu_check.py).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LORA_CONFIGS = ["lora_all", "floor", "ist_uniform", "ist_keep", "ist_offload", "ist_drop"]
FULL_CONFIGS = ["full_adamw", "ist_full_offload", "badam"]
DRY_CONFIGS = ["ist_offload", "badam"]
#: Packages the check needs that the GPU machines' image lacks: carried as wheels.
NEEDED = ("bitsandbytes", "badam")
PACKAGES = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "badam", "pytest",
            "hypothesis"]
OWN_FILES = ["results.jsonl", "summary.md", "log.txt", "pytest-cuda.xml", "memory-7b.jsonl",
             "memory-tiny.jsonl", "budget.jsonl", "budget-tiny.json"]
DRY_SKIP = "needs a CUDA device (marked cuda)"
#: The budget benchmark's model in dry mode: a tiny Llama (its config as a JSON file), deep
#: enough for every method of :data:`BUDGET_METHODS` to fit the budget at ``--margin 0.5``.
TINY_BUDGET_MODEL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 8, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 512,
                     "max_position_embeddings": 512, "tie_word_embeddings": True}


@dataclass
class Part:
    """One step of the check: a command with its own time limit, or a skip."""

    name: str
    command: list[str] | None
    timeout_s: float
    skip_reason: str | None = None
    jsonl: Path | None = None  # where the command appends its result rows


@dataclass
class Outcome:
    part: str
    status: str  # passed | failed | timeout | skipped
    seconds: float
    note: str = ""
    command: str = ""
    returncode: int | None = None


@dataclass
class Recorder:
    """Appends JSON records and rewrites the markdown summary after every part."""

    out: Path
    mode: str
    planned: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    budget: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name in OWN_FILES:  # results of an earlier check would mix with this one's
            (self.out / name).unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with (self.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def add_outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.write({"kind": "part", **outcome.__dict__})
        self.write_summary()
        print(f"[gpu-check] {verdict_line(outcome)} ({outcome.seconds:.1f} s)", flush=True)

    @property
    def passed(self) -> bool:
        """Every planned part ran and passed."""
        done = {o.part for o in self.outcomes}
        return all(o.status == "passed" for o in self.outcomes) and all(
            name in done for name in self.planned)

    def verdicts(self) -> list[str]:
        """One line per part (planned parts not reached yet: "not run"), then one per CUDA
        test; the first line is the check's own."""
        done = {o.part: o for o in self.outcomes}
        lines = [verdict_line(done[name]) if name in done else
                 f"FAIL {name}: not run (the check ended before it)" for name in self.planned]
        lines += [verdict_line(o) for o in self.outcomes if o.part not in self.planned]
        failed = sum(not line.startswith("PASS") for line in lines)
        head = (f"PASS gpu-check ({self.mode} mode): all {len(lines)} parts passed"
                if failed == 0 and lines else
                f"FAIL gpu-check ({self.mode} mode): {failed} of {len(lines)} parts did not "
                "pass")
        tests = [f"{'PASS' if t['outcome'] == 'passed' else 'FAIL'} {t['test']}: "
                 f"{t['outcome']}" + (f" ({_cell(t['message'])})" if t.get("message") else "")
                 for t in self.tests]
        if self.mode == "dry":  # the CUDA tests skip by design on the CPU
            tests = [f"DRY  {t['test']}: {t['outcome']}" for t in self.tests]
        return [head, *lines, *tests]

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
            f"Total: {time.monotonic() - self.started:.0f} s.",
            "",
            "## Verdicts",
            "",
            "```",
            *self.verdicts(),
            "```",
            "",
            "| part | status | seconds | note |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {o.part} | {o.status} | {o.seconds:.1f} | {_cell(o.note)} |"
                  for o in self.outcomes]
        if self.tests:
            lines += ["", "## CUDA tests (`pytest -m cuda`)", "",
                      "| test | outcome | seconds | message / measured |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']:.2f} | "
                      f"{_cell(_test_note(t))} |" for t in self.tests]
        if self.memory:
            lines += ["", "## Memory and speed (`python -m benchmarks.memory`, preset "
                      f"{self.memory[0].get('preset')}, device {self.memory[0].get('device')})",
                      "", "| config | active | peak MiB | state MiB | ms/step | round ms | loss |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in self.memory:
                rnd = f"{r['round_ms']:.0f}" if r.get("round_ms") is not None else "-"
                lines.append(
                    f"| {r['config']} | {r['active_layers']}/{r['layers']} | "
                    f"{r['peak_bytes'] / 2**20:.1f} | {r['state_bytes'] / 2**20:.2f} | "
                    f"{r['step_ms']:.0f} | {rnd} | {r['loss']:.4f} |")
        runs = [r for r in self.budget if r.get("phase") in ("sweep", "final")]
        if runs:
            lines += ["", "## Inside a memory budget (`python -m benchmarks.budget --random-init`)",
                      "", "| method | peak MiB | budget MiB | within | wall ms/step |",
                      "| --- | --- | --- | --- | --- |"]
            for r in runs:
                budget = r.get("budget_bytes")
                lines.append(
                    f"| {r['method']} | {r['peak_bytes'] / 2**20:.1f} | "
                    f"{'-' if budget is None else f'{budget / 2**20:.1f}'} | "
                    f"{'-' if budget is None else ('yes' if r['peak_bytes'] <= budget else 'NO')}"
                    f" | {1e3 * r['wall_seconds_per_step']:.0f} |")
        return "\n".join(lines) + "\n"

    def write_summary(self) -> None:
        (self.out / "summary.md").write_text(self.summary())


def verdict_line(outcome: Outcome) -> str:
    """``PASS part: note`` for a passed part; ``FAIL part: <status>: note`` otherwise (a
    skipped part fails the check: it checked nothing)."""
    if outcome.status == "passed":
        return f"PASS {outcome.part}" + (f": {_cell(outcome.note)}" if outcome.note else "")
    return f"FAIL {outcome.part}: {outcome.status}" + (
        f": {_cell(outcome.note)}" if outcome.note else "")


def _test_note(test: dict[str, Any]) -> str:
    props = "; ".join(f"{k}={v}" for k, v in test.get("properties", {}).items())
    return "; ".join(filter(None, [test.get("message", ""), props]))


def _cell(text: str) -> str:
    text = " ".join(str(text).split())
    text = text.replace("|", "\\|")
    return text if len(text) <= 200 else text[:197] + "..."


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
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                    "--format=csv,noheader"], capture_output=True, text=True,
                                   timeout=30)
            if query.returncode == 0 and query.stdout.strip():
                env["driver"] = query.stdout.strip().splitlines()[0]
        except subprocess.TimeoutExpired:
            env["driver"] = "nvidia-smi timed out"
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
    if part.command is None:
        raise ValueError(f"part {part.name!r} has no command (skipped: {part.skip_reason})")
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
    """Install the wheels of ``wheel_dir`` offline into ``site`` (skipped: none there)."""
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


def needed_packages(wheel_dir: Path, site: Path, env: dict[str, str], log: Path) -> Outcome:
    """The ``wheels`` part: install what ``wheel_dir`` carries, then check that every
    package of :data:`NEEDED` imports for the children (from the image or the wheels)."""
    start = time.monotonic()
    installed = install_wheels(wheel_dir, site, log)
    if installed.status in ("failed", "timeout"):
        return installed
    probe = ("import importlib, importlib.metadata as md, sys\nmissing = []\n"
             "for name in sys.argv[1:]:\n    try:\n        importlib.import_module(name)\n"
             "        print(name, md.version(name))\n"
             "    except Exception as error:\n        missing.append(f'{name} ({error})')\n"
             "print('missing:', '; '.join(missing))\nsys.exit(1 if missing else 0)\n")
    result = subprocess.run([sys.executable, "-c", probe, *NEEDED], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    with log.open("a") as f:
        f.write(f"\n===== wheels: import {' '.join(NEEDED)}\n{result.stdout}{result.stderr}")
    found = [line for line in result.stdout.splitlines()
             if line.split(" ")[0] in NEEDED]
    carried = installed.note if installed.status == "passed" else "no wheels carried"
    if result.returncode != 0:
        missing = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else \
            result.stderr.strip()[-300:]
        return Outcome("wheels", "failed", time.monotonic() - start,
                       f"{missing}; {carried}: run bash scripts/gpu-wheels.sh here and "
                       "carry .whl/", installed.command, result.returncode)
    return Outcome("wheels", "passed", time.monotonic() - start,
                   f"{', '.join(found)} import ({carried})", installed.command, 0)


def pytest_records(xml_path: Path, log: Path) -> list[dict[str, Any]]:
    """Per-test outcomes (and recorded properties) from the JUnit XML, or, after a
    time-out, from ``-v`` lines."""
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
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            records.append({"kind": "test", "test": name, "outcome": outcome,
                            "seconds": float(case.get("time", 0.0)), "message": message,
                            "properties": props})
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
    command = [sys.executable, "-m", "benchmarks.memory", "--preset", preset, "--device", device,
               "--configs", name, "--out", str(jsonl)]
    return Part(f"memory-{preset}:{name}", command, timeout_s, jsonl=jsonl)


#: The budget benchmark's methods on the GPU: the baseline, the same updates under the
#: budget, IST with adapters and with full fine-tuning.
BUDGET_METHODS = ("lora+gc", "lora+budget", "lora+ist-fo-da+budget", "full+ist-3+budget")


def budget_part(device: str, out: Path, timeout_s: float, scratch: Path) -> Part:
    """``python -m benchmarks.budget`` on a random-init model (SmolLM2-135M's shape on the GPU, a
    tiny Llama in dry mode) with the repo's docs as text (byte tokens): memory and time.
    The model is saved under ``scratch`` (not ``out``: 0.5 GB that should not travel back)."""
    if device == "cpu":
        model = out / "budget-tiny.json"
        model.write_text(json.dumps(TINY_BUDGET_MODEL))
        sizes = ["--steps", "2", "--eval-every", "2", "--batch-size", "2", "--seq-len", "256",
                 "--eval-blocks", "2", "--eval-batch", "1", "--margin", "0.5"]
    else:
        model = "smollm2-135m"
        sizes = ["--steps", "10", "--eval-every", "10", "--eval-blocks", "4",
                 "--eval-batch", "4"]
    command = [sys.executable, "-m", "benchmarks.budget", "--device", device, "--random-init",
               "--model", str(model), "--data", str(ROOT / "docs"), "--seeds", "0",
               "--lrs", "1e-3", "--methods", *BUDGET_METHODS, *sizes,
               "--random-init-dir", str(scratch), "--out", str(out / "budget.jsonl")]
    return Part("budget", command, timeout_s, jsonl=out / "budget.jsonl")


def cuda_test_files() -> list[str]:
    """The test files that mark tests ``cuda`` (collecting only them saves importing the
    rest of the suite); ``-m cuda`` then selects the marked tests in them."""
    files = sorted(p for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.cuda" in p.read_text(errors="replace"))
    return [str(p.relative_to(ROOT)) for p in files] or ["tests"]


def plan(dry: bool, out: Path, env: dict[str, str], args: argparse.Namespace,
         scratch: Path | None = None) -> list[Part]:
    """The parts after ``environment`` and ``wheels``, in the order they run (``scratch``:
    a folder for what should not land in ``out``, default a new temporary one)."""
    scratch = scratch if scratch is not None else Path(tempfile.mkdtemp(prefix="ist-gpu-"))
    device, preset = ("cpu", "tiny") if dry else ("cuda", "7b")
    pytest_cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rs",
                  "-p", "no:cacheprovider", f"--junitxml={out / 'pytest-cuda.xml'}",
                  *cuda_test_files()]
    parts = [Part("pytest-cuda", pytest_cmd, args.pytest_timeout)]
    configs = DRY_CONFIGS if dry else LORA_CONFIGS
    parts += [memory_part(c, preset, device, out, args.config_timeout) for c in configs]
    parts.append(budget_part(device, out, args.budget_timeout, scratch))
    if not dry:
        parts += [memory_part(c, preset, device, out, args.config_timeout)
                  for c in FULL_CONFIGS]
    return parts


def build_parser() -> argparse.ArgumentParser:
    """The command line of the check (defaults: every part within 420 s, which
    scripts/gpu-check.sh's hard limit of 470 s encloses)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-results")
    parser.add_argument("--dry", action="store_true",
                        help="CPU dry mode even when a GPU is visible (default without one)")
    parser.add_argument("--total-timeout", type=float, default=420.0,
                        help="seconds for every part together (default 420)")
    parser.add_argument("--pytest-timeout", type=float, default=150.0)
    parser.add_argument("--config-timeout", type=float, default=45.0,
                        help="seconds per benchmarks.memory configuration")
    parser.add_argument("--budget-timeout", type=float, default=100.0)
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    deadline = time.monotonic() + args.total_timeout

    import torch

    dry = args.dry or not torch.cuda.is_available()
    mode = "dry" if dry else "gpu"
    out = args.out.resolve()
    rec = Recorder(out, mode)
    log = out / "log.txt"
    print(f"[gpu-check] {mode} mode, {args.total_timeout:.0f} s for every part together, "
          f"results in {out}/", flush=True)
    site = Path(tempfile.mkdtemp(prefix="ist-gpu-check-site-"))
    scratch = Path(tempfile.mkdtemp(prefix="ist-gpu-check-scratch-"))
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                     HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if dry:  # on the CPU also where a GPU is visible; tiny work, threads only contend
        child_env.update(CUDA_VISIBLE_DEVICES="")
        child_env.setdefault("OMP_NUM_THREADS", "1")
    paths = [str(site), str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    child_env["PYTHONPATH"] = os.pathsep.join(paths)

    parts = plan(dry, out, child_env, args, scratch)
    rec.planned = ["environment", "wheels", *(p.name for p in parts)]
    rec.write_summary()  # every part "not run" until it ends
    try:
        rec.environment = environment(mode)
        rec.write(rec.environment)
        rec.add_outcome(Outcome("environment", "passed", time.monotonic() - rec.started,
                                rec.environment.get("gpu", "no CUDA device: dry mode on the "
                                                           "CPU")))
    except Exception as error:  # noqa: BLE001  (the record says why, the check goes on)
        rec.add_outcome(Outcome("environment", "failed", time.monotonic() - rec.started,
                                f"{type(error).__name__}: {error}"))
    rec.add_outcome(needed_packages(args.wheels, site, child_env, log))
    rec.environment["packages"] = {name: _version(name) for name in PACKAGES}

    for part in parts:
        left = deadline - time.monotonic()
        if part.skip_reason is not None:
            rec.add_outcome(Outcome(part.name, "skipped", 0.0, part.skip_reason))
            continue
        if left < 10:
            rec.add_outcome(Outcome(part.name, "skipped", 0.0,
                                    f"out of time: the {args.total_timeout:.0f} s budget is "
                                    "spent"))
            continue
        part.timeout_s = min(part.timeout_s, left)
        rec.add_outcome(run_part(part, child_env, log, out, rec))

    print(rec.summary(), flush=True)
    print(f"[gpu-check] results in {out}/ (results.jsonl, summary.md, log.txt)", flush=True)
    shutil.rmtree(site, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if rec.passed else 1


def run_part(part: Part, env: dict[str, str], log: Path, out: Path, rec: Recorder) -> Outcome:
    jsonl = part.jsonl
    rows_before = len(jsonl.read_text().splitlines()) if jsonl and jsonl.exists() else 0
    code, seconds, timed_out = run_command(part, env, log)
    command = " ".join(part.command or [])
    status = "timeout" if timed_out else ("passed" if code == 0 else "failed")
    note = f"killed after {part.timeout_s:.0f} s" if timed_out else ""
    rows = (jsonl.read_text().splitlines()[rows_before:] if jsonl is not None and jsonl.exists()
            else [])
    if part.name == "pytest-cuda":
        status, note = _pytest_verdict(status, note, code, rec, out, log)
    elif part.name.startswith("memory-"):
        for row in map(json.loads, rows):
            rec.write({"kind": "memory", **row})
            rec.memory.append(row)
            note = (f"peak {row['peak_bytes'] / 2**20:.0f} MiB, "
                    f"{row['step_ms']:.0f} ms/step")
        if not rows and status == "passed":  # benchmarks.memory reports a failed config on stderr
            status, note = "failed", "the configuration failed (see log.txt)"
    else:  # the budget benchmark's rows
        runs = []
        for row in map(json.loads, rows):
            rec.write({"kind": part.name, **row})
            rec.budget.append(row)
            if row.get("phase") in ("sweep", "final"):
                runs.append(row)
        over = [r["method"] for r in runs if r.get("budget_bytes") is not None
                and r["peak_bytes"] > r["budget_bytes"]]
        unfit = [r["method"] for r in rec.budget if r.get("phase") == "fit" and not r["fits"]]
        if status == "passed":
            note = "; ".join(filter(None, [
                f"{len(runs)} of {len(BUDGET_METHODS)} methods ran",
                f"over the budget: {', '.join(over)}" if over else
                "each within its budget" if runs else "",
                f"did not fit, not run: {', '.join(unfit)}" if unfit else ""]))
            if over or unfit or len(runs) < len(BUDGET_METHODS):
                status = "failed"
    if status == "failed":
        error = last_error(log, part.name)
        note = "; ".join(filter(None, [note or f"exit {code} (see log.txt)", error]))
    return Outcome(part.name, status, seconds, note, command, code)


def _pytest_verdict(status: str, note: str, code: int | None, rec: Recorder, out: Path,
                    log: Path) -> tuple[str, str]:
    """The ``pytest-cuda`` verdict. GPU mode: every selected test passed (a skip, e.g. a
    missing package, is a failure). Dry mode: every test was collected and skipped for
    want of a device, and nothing else."""
    tests = pytest_records(out / "pytest-cuda.xml", log)
    for t in tests:
        rec.write(t)
    rec.tests += tests
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    note = "; ".join(filter(None, [note, ", ".join(f"{n} {k}" for k, n in counts.items())]))
    if code == 5 or not tests:  # pytest: no test collected
        return "failed", "no test marked cuda was collected"
    if status == "timeout":
        return status, note
    if rec.mode == "dry":
        other = [t["test"] for t in tests
                 if t["outcome"] != "skipped" or t["message"] != DRY_SKIP]
        if other:
            return "failed", f"{note}; not skipped for want of a device: {', '.join(other[:3])}"
        return "passed", f"{note} (dry mode: collected, skipped for want of a device)"
    skipped = [t for t in tests if t["outcome"] == "skipped"]
    if any(t["message"] == DRY_SKIP for t in skipped):
        return "failed", "pytest saw no CUDA device although this process does"
    if skipped:
        return "failed", (f"{note}; a skipped CUDA test checked nothing: "
                          f"{skipped[0]['test']} ({skipped[0]['message']})")
    return status, note


def last_error(log: Path, part: str) -> str:
    """The last line of ``part``'s output in ``log`` that names an error, if any."""
    text = log.read_text(errors="replace")
    section = text[text.rfind(f"===== {part}: "):]
    errors = [line.strip() for line in section.splitlines()
              if "Error" in line or "error:" in line or line.startswith("FAILED ")]
    return errors[-1] if errors else ""

