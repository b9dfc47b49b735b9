"""ist-finetune --save-every / --resume: a run killed with SIGKILL (between steps, and in
the middle of writing a checkpoint) and resumed ends with an adapter bit-identical to an
uninterrupted run with the same flags; checkpoints are written atomically.

The kills use the CLI's documented test hook (``IST_FINETUNE_TEST_PAUSE_AT``, see
``ist_optim/cli/checkpoints.py``): the process pauses at an exact point and this test sends
it SIGKILL there, so where the kill lands is deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama_dir

from ist_optim.cli import main
from ist_optim.cli.checkpoints import (
    TEST_PAUSE_ENV,
    TEST_PAUSE_FILE_ENV,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
)
from ist_optim.cli.parser import parse_args
from ist_optim.cli.train import RunResult

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short "
        "a date. ") * 6


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread here and in the killed subprocesses (OMP_NUM_THREADS=1): the
    same reductions everywhere, and no CPU burnt spinning on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny Llama of the CLI tests, with attention dropout on: the global RNG matters."""
    folder = save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama-dropout"), [TEXT])
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(5):
        (folder / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT)
    return folder


def _flags(model_dir: Path, corpus: Path, *extra: str, ist: bool = True) -> list[str]:
    ist_flags = ["--update-interval", "3", "--active-layers", "2"] if ist else []
    return ["--model", str(model_dir), "--data", str(corpus), "--batch-size", "2",
            "--seq-len", "16", "--eval-batches", "1", "--seed", "3", "--no-progress",
            *ist_flags, *extra]


def _adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _run_in_process(argv: list[str], capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _run_until_paused(argv: list[str], pause_at: str, tmp_path: Path) -> None:
    """Start ``python -m ist_optim argv`` with the pause hook at ``pause_at``, wait until it
    pauses there, and kill it with SIGKILL."""
    marker = tmp_path / f"paused-{pause_at.replace(':', '-')}"
    env = {**os.environ, TEST_PAUSE_ENV: pause_at, TEST_PAUSE_FILE_ENV: str(marker),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ist_optim", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (status {proc.returncode}) before pausing at "
                            f"{pause_at}: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not reach {pause_at} within 120 s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_sigkill_between_steps_and_inside_a_checkpoint_write_then_resume_is_exact(
        model_dir, corpus, tmp_path, capsys):
    """Uninterrupted run vs: killed after step 6 (checkpoint of step 4 on disk), resumed and
    killed while writing the checkpoint of step 8, resumed to the end. IST with offloaded
    state, importance rounds, a cosine schedule with warm-up, attention dropout."""
    flags = _flags(model_dir, corpus, "--steps", "12", "--lr-schedule", "cosine",
                   "--warmup-steps", "2", "--sampling", "importance",
                   "--ist-kwarg", "state_policy=offload")
    reference = tmp_path / "reference"
    _run_in_process([*flags, "--output-dir", str(reference)], capsys)

    run = tmp_path / "run"
    argv = [*flags, "--save-every", "4", "--output-dir", str(run)]
    _run_until_paused(argv, "step:6", tmp_path)
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004"]
    assert not (run / "adapter").exists()

    _run_until_paused([*argv, "--resume"], "save:8", tmp_path)
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names[-1] == "step-000004" and any(n.startswith(".partial-step-000008") for n in names)
    assert latest_checkpoint(checkpoints).name == "step-000004"
    load_checkpoint(checkpoints / "step-000004")  # intact: every file loads

    out = _run_in_process([*argv, "--resume"], capsys)
    assert "resuming from" in out and "step-000004 (step 4)" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000012"]  # older pruned
    _assert_identical(_adapter(run), _adapter(reference))
    for name in ("importance.json",):
        assert (run / name).read_text() == (reference / name).read_text()
    ours = json.loads((run / "results.json").read_text())
    theirs = json.loads((reference / "results.json").read_text())
    assert ours["train_losses"] == theirs["train_losses"]
    assert ours["val_loss_after"] == theirs["val_loss_after"]
    assert len(ours["train_losses"]) == 12


def test_extend_a_finished_adamw_run_matches_a_longer_run(model_dir, corpus, tmp_path, capsys):
    """Constant learning rate: --steps may grow on resume (plain AdamW, dropout on)."""
    flags = _flags(model_dir, corpus, "--optimizer", "adamw", "--lr-schedule", "constant",
                   ist=False)
    reference = tmp_path / "reference"
    _run_in_process([*flags, "--steps", "8", "--output-dir", str(reference)], capsys)
    run = tmp_path / "run"
    _run_in_process([*flags, "--steps", "5", "--save-every", "5", "--output-dir", str(run)],
                    capsys)
    out = _run_in_process([*flags, "--steps", "8", "--resume", "--output-dir", str(run)],
                          capsys)
    assert "(step 5)" in out
    _assert_identical(_adapter(run), _adapter(reference))


def test_resume_without_checkpoint_starts_fresh_and_keeps_k(model_dir, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    flags = _flags(model_dir, corpus, "--steps", "6", "--save-every", "2",
                   "--keep-checkpoints", "2", "--output-dir", str(run), "--resume")
    out = _run_in_process(flags, capsys)
    assert "resuming" not in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000004", "step-000006"]
    saved = load_checkpoint(run / "checkpoints" / "step-000006")
    assert saved["run"]["step"] == 6 and saved["run"]["data"] == {"batches_drawn": 6}
    assert "ist" in saved["optimizer"] and saved["optimizer"]["ist"]["sampler"]
    assert len(saved["run"]["result"]["history"]["steps"]) == 6
    assert all(".lora_" in name for name in saved["trainable"])


@pytest.mark.parametrize("changed, fragment", [
    (["--lr", "0.002"], "--lr"),
    (["--seed", "4"], "--seed"),
    (["--ist-kwarg", "state_policy=drop"], "--ist-kwarg"),
])
def test_resume_with_other_flags_is_one_line_error(model_dir, corpus, tmp_path, capsys,
                                                   changed, fragment):
    run = tmp_path / "run"
    flags = _flags(model_dir, corpus, "--steps", "2", "--save-every", "2",
                   "--output-dir", str(run))
    _run_in_process(flags, capsys)
    code = main([*flags, "--resume", *changed])
    _out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ist-finetune: error: --resume: ")
    assert fragment in err and "another --output-dir" in err


@pytest.mark.parametrize("extra, fragment", [
    (["--compare", "--save-every", "2"], "--save-every cannot be used with --compare"),
    (["--optimizer", "badam", "--resume"], "--resume is not supported with --optimizer badam"),
])
def test_checkpoint_flag_errors(model_dir, corpus, tmp_path, capsys, extra, fragment):
    code = main(_flags(model_dir, corpus, "--steps", "2", "--output-dir",
                       str(tmp_path / "o"), *extra))
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_negative_save_every_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--save-every", "-1"])
    assert exc.value.code == 2 and "expected an integer >= 0" in capsys.readouterr().err


def test_failed_write_leaves_the_previous_checkpoint(model_dir, corpus, tmp_path, capsys,
                                                     monkeypatch):
    """An exception in the middle of a checkpoint write (disk full) removes the partial
    folder and leaves the previous checkpoint as it was."""
    run = tmp_path / "run"
    flags = _flags(model_dir, corpus, "--steps", "4", "--save-every", "2",
                   "--output-dir", str(run))
    import ist_optim.cli.checkpoints as checkpoints

    real = checkpoints.pause_point

    def disk_full(kind: str, step: int) -> None:
        if (kind, step) == ("save", 4):
            raise OSError(28, "No space left on device")
        real(kind, step)

    monkeypatch.setattr(checkpoints, "pause_point", disk_full)
    with pytest.raises(OSError, match="No space left"):
        main(flags)
    capsys.readouterr()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    assert load_checkpoint(run / "checkpoints" / "step-000002")["run"]["step"] == 2


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    import random

    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random())
    torch.rand(5)
    random.random()
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_run_result_state_round_trip():
    result = RunResult(train_losses=[2.0, 1.5], step_seconds=[0.1, 0.2],
                       step_cpu_seconds=[0.1, 0.3])
    assert RunResult.from_state(json.loads(json.dumps(result.to_state()))) == result


def test_parser_checkpoint_flags():
    args = parse_args(["--save-every", "50", "--resume", "--keep-checkpoints", "3",
                       "--lr-schedule", "linear", "--warmup-steps", "10"])
    assert (args.save_every, args.resume, args.keep_checkpoints) == (50, True, 3)
    assert (args.lr_schedule, args.warmup_steps) == ("linear", 10)


def test_resume_in_the_middle_of_the_default_dense_phase_is_exact(model_dir, corpus, tmp_path,
                                                                  capsys):
    """The measured recipe (no flag): 10 dense steps of 20, 2 warm-up steps, linear decay.
    A run whose newest checkpoint is from step 1 (inside the dense phase and the warm-up)
    resumes to the adapter of an uninterrupted run."""
    flags = _flags(model_dir, corpus, "--steps", "20")
    reference = tmp_path / "reference"
    _run_in_process([*flags, "--output-dir", str(reference)], capsys)
    run = tmp_path / "run"
    _run_in_process([*flags, "--save-every", "1", "--keep-checkpoints", "20",
                     "--output-dir", str(run)], capsys)
    saved = load_checkpoint(run / "checkpoints" / "step-000001")
    assert saved["run"]["fingerprint"]["dense_steps"] == 10
    assert saved["run"]["fingerprint"]["warmup_steps"] == 2
    for later in sorted((run / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    out = _run_in_process([*flags, "--resume", "--output-dir", str(run)], capsys)
    assert "(step 1)" in out
    _assert_identical(_adapter(run), _adapter(reference))


def test_checkpoint_from_before_the_recipes_resumes_with_paper(model_dir, corpus, tmp_path,
                                                               capsys):
    """A checkpoint written before --paper / --dense-steps existed (its fingerprint lacks
    both; the paper's settings were the only ones) resumes exactly with --paper, and
    without it is refused in one line that names --paper."""
    flags = _flags(model_dir, corpus, "--steps", "6", "--paper")
    reference = tmp_path / "reference"
    _run_in_process([*flags, "--output-dir", str(reference)], capsys)
    run = tmp_path / "run"
    _run_in_process([*flags, "--save-every", "3", "--keep-checkpoints", "2",
                     "--output-dir", str(run)], capsys)
    shutil.rmtree(run / "checkpoints" / "step-000006")
    path = run / "checkpoints" / "step-000003" / "run.pt"
    state = torch.load(path, weights_only=True)
    for key in ("paper", "dense_steps"):
        del state["fingerprint"][key]
    torch.save(state, path)
    without = [f for f in flags if f != "--paper"]
    code = main([*without, "--resume", "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--paper" in err
    out = _run_in_process([*flags, "--resume", "--output-dir", str(run)], capsys)
    assert "(step 3)" in out
    _assert_identical(_adapter(run), _adapter(reference))


def test_paper_is_the_paper_settings_spelled_out(model_dir, corpus, tmp_path, capsys):
    """--paper trains exactly as the paper's flags written out (the settings every run had
    before the recipes: constant 1e-3, importance draws from the first step)."""
    flags = _flags(model_dir, corpus, "--steps", "6")
    _run_in_process([*flags, "--paper", "--output-dir", str(tmp_path / "paper")], capsys)
    _run_in_process([*flags, "--lr", "1e-3", "--lr-schedule", "constant", "--warmup-steps",
                     "0", "--dense-steps", "0", "--sampling", "importance",
                     "--output-dir", str(tmp_path / "spelled")], capsys)
    _assert_identical(_adapter(tmp_path / "paper"), _adapter(tmp_path / "spelled"))
    _run_in_process([*flags, "--output-dir", str(tmp_path / "measured")], capsys)
    assert not torch.equal(*(next(iter(_adapter(tmp_path / name).values()))
                             for name in ("paper", "measured")))
