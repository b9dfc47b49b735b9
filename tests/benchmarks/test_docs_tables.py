"""Every ``--report`` command of docs/benchmarks.md prints, on the committed results, the
table the docs show under it, byte for byte, and writes the committed ``--table`` file.

The docs mark a command's output with ``<!-- output of the --report command above -->``
... ``<!-- end of output -->``; the command is the ``python -m benchmarks.<study> --report``
line of the last ``bash`` block before it, run with that block's variable assignments
(``R=...``), from a copy of ``benchmarks/results`` (so ``--table`` and ``--plot`` write
there, not into the repository).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- output of the --report command above -->"
END = "<!-- end of output -->"
COMMAND = re.compile(r"^python -m benchmarks\.\w+ .*--report\b")
ASSIGNMENT = re.compile(r'^[A-Z_][A-Z0-9_]*=("[^"]*"|[^\s"]+)\s*(#.*)?$')  # a whole line


@dataclass
class DocReport:
    """A report command of the docs and the output they show for it."""

    line: int  # of the command, 1-based
    setup: list[str]  # the block's assignments before the command
    command: str
    expected: str


def _blocks(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line index of each fenced ``bash`` block's body."""
    blocks, start = [], None
    for i, line in enumerate(lines):
        if start is None and line.strip() == "```bash":
            start = i + 1
        elif start is not None and line.strip() == "```":
            blocks.append((start, i))
            start = None
    return blocks


def doc_reports(text: str) -> list[DocReport]:
    """The report commands of ``text`` with their outputs.

    Raises:
        AssertionError: a report command outside a ``bash`` block, two in one block, one
            with no output after it, or an output with no command before it.

    Example:
        >>> doc = ("```bash\\nR=x\\npython -m benchmarks.a --report $R/r.jsonl \\\\\\n"
        ...        "    --table t.md\\n```\\n\\n" + BEGIN + "\\n| a |\\n" + END + "\\n")
        >>> [(r.setup, r.command, r.expected) for r in doc_reports(doc)]
        [(['R=x'], 'python -m benchmarks.a --report $R/r.jsonl --table t.md', '| a |')]
    """
    lines = text.split("\n")
    blocks = _blocks(lines)
    inside = {i for first, last in blocks for i in range(first, last)}
    stray = [i + 1 for i, line in enumerate(lines)
             if COMMAND.match(line.strip()) and i not in inside]
    assert not stray, f"report commands outside a ```bash block, lines {stray}"
    commands = []  # (first line of the block, its last, the assignments, the command)
    for first, last in blocks:
        body = "\n".join(lines[first:last]).replace("\\\n", " ").split("\n")
        at = [k for k, c in enumerate(body) if COMMAND.match(c)]
        assert len(at) <= 1, f"line {first}: one report command per block"
        if at:
            setup = [c.split("#")[0].strip() for c in body[:at[0]] if ASSIGNMENT.match(c)]
            commands.append((first, last, setup, " ".join(body[at[0]].split())))
    outputs = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    found = []
    for k, (first, last, setup, command) in enumerate(commands):
        limit = commands[k + 1][0] if k + 1 < len(commands) else len(lines)
        begin = next((i for i in outputs if last < i < limit), None)
        assert begin is not None, f"line {first}: the report command has no output block"
        end = lines.index(END, begin)
        found.append(DocReport(first + 1, setup, command, "\n".join(lines[begin + 1:end])))
    assert len(found) == len(outputs), "an output block with no report command before it"
    return found


REPORTS = doc_reports(DOCS.read_text())


def test_the_docs_have_their_report_commands():
    """The quality, few-data, budget and frontier studies' report commands (a parser that
    finds none would make the test below pass on nothing)."""
    studies = [r.command.split()[2] for r in REPORTS]
    assert len(REPORTS) == 9
    assert set(studies) == {"benchmarks.quality", "benchmarks.few_data", "benchmarks.budget",
                            "benchmarks.frontier"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with a copy of the committed results and a ``python`` on ``PATH`` that is
    this interpreter."""
    folder = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "benchmarks" / "results", folder / "benchmarks" / "results")
    shim = folder / "bin"
    shim.mkdir()
    python = shim / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return folder


def run_report(report: DocReport, workdir: Path) -> str:
    """What ``report``'s command prints, run in ``workdir`` as the docs write it."""
    script = "\n".join(["set -euo pipefail", *report.setup, report.command])
    env = {**os.environ, "PATH": f"{workdir / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("report", REPORTS, ids=lambda r: f"line{r.line}")
def test_a_report_command_prints_the_table_of_the_docs(report, workdir):
    import transformers

    if "benchmarks.frontier" in report.command and \
            int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the frontier report's predicted step times are transformers 5's (4.x "
                    "passes each block an attention mask: other operators, +0.2 points)")
    printed = run_report(report, workdir)
    assert printed.strip("\n") == report.expected.strip("\n"), (
        f"docs/benchmarks.md line {report.line}: `{report.command}` prints another table "
        "than the docs show; update the docs (or the report) so that they agree")
    table = re.search(r"--table (\S+)", report.command)
    if table:
        path = table.group(1).replace("$R", next(
            (a.split("=", 1)[1] for a in report.setup if a.startswith("R=")), "$R"))
        assert (workdir / path).read_bytes() == (ROOT / path).read_bytes(), (
            f"{path}: the committed table is not what `{report.command}` writes")


def test_a_drifted_table_fails(workdir):
    """The comparison sees one changed figure."""
    report = next(r for r in REPORTS if "linear-400-steps" in r.command)
    drifted = DocReport(report.line, report.setup, report.command,
                        report.expected.replace("+0.0688", "+0.0689"))
    assert run_report(drifted, workdir).strip("\n") != drifted.expected.strip("\n")
