"""ist-finetune: argument parsing, data loading and splitting, bad input, end-to-end runs on a
tiny random-init Llama saved with a byte-level tokenizer (nothing downloaded)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lm_batch, lora_model, save_tiny_llama_dir
from hypothesis import given
from hypothesis import strategies as st

from ist_optim.cli import CLIError, main
from ist_optim.cli.data import (
    Document,
    block_batches,
    heldout_indices,
    load_documents,
    split_documents,
)
from ist_optim.cli.parser import ist_kwargs_from_args, parse_args
from ist_optim.cli.train import (
    LR_SCHEDULES,
    build_optimizer,
    build_scheduler,
    optimizer_state_bytes,
)
from ist_optim.memory import PeakMemory

REPO = Path(__file__).resolve().parents[1]

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short "
        "a date. ") * 6


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama and a byte-level BPE tokenizer trained on TEXT, saved."""
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), [TEXT])


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder of five short documents."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(5):
        (folder / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT)
    return folder


# --------------------------------------------------------------------------- parsing
def test_parse_defaults_and_ist_options():
    args = parse_args([])
    assert (args.model, args.data, args.peft, args.optimizer) == (
        "smollm2-135m", "shakespeare", "lora", "ist")
    assert ist_kwargs_from_args(args) == {}
    args = parse_args(["--active-layers", "0.5", "--suppressed-layers", "2", "--update-interval",
                       "3", "--num-candidates", "4", "--score-lr", "5", "--suppression", "0.1",
                       "--sampling", "uniform", "--ist-kwarg", "freeze_inactive=false",
                       "--ist-kwarg", "suppression_mode=residual", "--rank", "4",
                       "--steps", "7", "--batch-size", "2", "--seq-len", "16", "--seed", "3",
                       "--peft", "dora", "--compare", "--output-dir", "o"])
    assert ist_kwargs_from_args(args) == {
        "active_layers": 0.5, "suppressed_layers": 2, "update_interval": 3,
        "num_candidates": 4, "score_lr": 5.0, "suppression": 0.1, "sampling": "uniform",
        "freeze_inactive": False, "suppression_mode": "residual"}
    assert (args.rank, args.steps, args.batch_size, args.seq_len, args.seed) == (4, 7, 2, 16, 3)
    assert args.peft == "dora" and args.compare and args.output_dir == "o"


@pytest.mark.parametrize("argv, fragment", [
    (["--peft", "lorax"], "invalid choice: 'lorax'"),
    (["--steps", "0"], "expected an integer >= 1, got 0"),
    (["--active-layers", "many"], "expected a layer count"),
    # an IST flag is checked as ISTConfig checks the option, when parsed (issue 33)
    (["--sampling", "sideways"], "argument --sampling: Invalid sampling: 'sideways'"),
    (["--update-interval", "0"], "Invalid update_interval: 0; expected an int >= 1"),
    (["--ist-kwarg", "novalue"], "expected KEY=VALUE"),
])
def test_parse_errors_are_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and err.startswith("ist-finetune: error:")


# --------------------------------------------------------------------------- data
def test_load_text_file_folder_and_jsonl(tmp_path, corpus):
    single = tmp_path / "one.txt"
    single.write_text("hello world")
    assert load_documents(str(single)) == [Document("one.txt", "hello world")]
    (corpus / "sub").mkdir()
    (corpus / "sub" / "deep.md").write_text("deep text")
    (corpus / "skip.bin").write_bytes(b"\x00\x01")
    names = [d.name for d in load_documents(str(corpus))]
    assert names == [f"doc{i}.txt" for i in range(5)] + ["sub/deep.md"]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "a b c"}\n\n{"text": "  "}\n{"text": "d e", "id": 2}\n')
    docs = load_documents(str(jsonl))
    assert [d.text for d in docs] == ["a b c", "d e"]  # blank lines and empty texts dropped


@pytest.mark.parametrize("content, fragment", [
    ('{"text": 1}\n', 'data.jsonl:1: expected an object with a string "text" field'),
    ('{"text": "ok"}\nnot json\n', "data.jsonl:2: not valid JSON"),
    ('{"text": ""}\n', "no text found"),
])
def test_bad_jsonl(tmp_path, content, fragment):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(CLIError, match=fragment.replace("(", r"\(")):
        load_documents(str(path))


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(CLIError, match="no such file or folder"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(CLIError, match="holds no .txt or .md file"):
        load_documents(str(tmp_path))


@given(st.integers(2, 500), st.floats(0.01, 0.99))
def test_heldout_indices_are_a_proper_spread_subset(num_docs, fraction):
    held = heldout_indices(num_docs, fraction)
    assert held == sorted(set(held))
    assert 1 <= len(held) <= num_docs - 1
    assert all(0 <= i < num_docs for i in held)
    assert len(held) == min(num_docs - 1, max(1, round(fraction * num_docs)))


def test_heldout_fraction_out_of_range():
    with pytest.raises(CLIError, match="--val-fraction 1.0"):
        heldout_indices(10, 1.0)


@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=30), st.floats(0.05, 0.9))
def test_split_partitions_the_documents(texts, fraction):
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    train, val = split_documents(docs, fraction)
    assert train and val
    if len(docs) == 1:
        assert train[0] + val[0] == texts[0]
    else:
        assert sorted(train + val) == sorted(texts)
        assert len(val) == len(heldout_indices(len(docs), fraction))


def test_block_batches_order_and_epochs():
    tokens = torch.arange(50)
    evaluation = list(block_batches(tokens, 4, 3))
    assert len(evaluation) == 4 and evaluation[0]["input_ids"].tolist()[0] == [0, 1, 2, 3]
    assert all(torch.equal(b["input_ids"], b["labels"]) for b in evaluation)
    first = list(block_batches(tokens, 4, 3, generator=torch.Generator().manual_seed(1),
                               max_batches=8))
    again = list(block_batches(tokens, 4, 3, generator=torch.Generator().manual_seed(1),
                               max_batches=8))
    pairs = zip(first, again, strict=True)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in pairs)
    epoch = torch.cat([b["input_ids"] for b in first[:4]]).flatten()
    assert len(set(epoch.tolist())) == 48  # one epoch visits 12 distinct blocks
    with pytest.raises(CLIError, match="one batch needs --batch-size 13"):
        next(block_batches(tokens, 4, 13))


# --------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("kind", ["adamw", "ist", "badam"])
def test_build_optimizer_kinds_train(kind):
    if kind == "badam":
        pytest.importorskip("badam")
    model = lora_model(4)
    opt = build_optimizer(kind, model, lr=1e-2, seed=0, badam_switch_every=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    for seed in range(2):
        model(**lm_batch(seed=seed)).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = [n for n, p in model.named_parameters() if "lora" in n
               and not torch.equal(p.detach(), before[n])]
    assert changed
    assert optimizer_state_bytes(opt) > 0


def test_build_optimizer_rejects_bad_options():
    model = lora_model(4)
    with pytest.raises(CLIError, match="IST option rejected: .*score_lr"):
        build_optimizer("ist", model, lr=1e-3, seed=0, ist_kwargs={"score_lr": -1.0})
    with pytest.raises(CLIError, match="apply only to 'ist'"):
        build_optimizer("adamw", model, lr=1e-3, seed=0, ist_kwargs={"active_layers": 1})
    with pytest.raises(CLIError, match="unknown"):
        build_optimizer("sgd", model, lr=1e-3, seed=0)


def _hand_written_factor(kind: str, warmup: int, total: int, step: int) -> float:
    """The factor of ``ist-finetune``'s own schedules before they became
    ``transformers.get_scheduler``'s (the removed code, kept to show the rates held)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


@given(kind=st.sampled_from(LR_SCHEDULES), warmup=st.integers(0, 30),
       total=st.integers(1, 120))
def test_schedules_are_transformers_and_keep_the_rates(kind, warmup, total):
    """``--lr-schedule`` is ``transformers.get_scheduler`` (the HF Trainer's rates, bit for
    bit), and every step trains at the rate of the hand-written schedule it replaced (the
    two formulas round differently: at most 2**-50 of the rate apart)."""
    from transformers import get_scheduler

    lr = 2e-3
    opts = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr) for _ in range(2)]
    ours = build_scheduler(opts[0], kind, warmup_steps=warmup, total_steps=total)
    theirs = get_scheduler("constant_with_warmup" if kind == "constant" else kind, opts[1],
                           num_warmup_steps=warmup, num_training_steps=total)
    assert (ours is None) == (kind == "constant" and warmup == 0)
    for step in range(total):
        rate = opts[0].param_groups[0]["lr"]
        assert rate == opts[1].param_groups[0]["lr"]
        assert abs(rate - lr * _hand_written_factor(kind, warmup, total, step)) <= lr * 2**-50
        for opt, sched in zip(opts, (ours, theirs), strict=True):
            opt.step()
            if sched is not None:
                sched.step()


def test_build_scheduler_rejects_bad_options():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(CLIError, match="--lr-schedule step: unknown; choose one of constant"):
        build_scheduler(opt, "step", warmup_steps=0, total_steps=4)
    with pytest.raises(CLIError, match="--warmup-steps -1: must be at least 0"):
        build_scheduler(opt, "linear", warmup_steps=-1, total_steps=4)


def test_peak_memory_sees_a_new_allocation():
    meter = PeakMemory("cpu")
    meter.reset()
    base = meter.peak_bytes()
    block = torch.ones(50_000_000)  # 200 MB
    block.add_(1)
    assert meter.peak_bytes() >= base + 150_000_000
    del block


# --------------------------------------------------------------------------- main
def _run_main(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra, fragment", [
    (["--data", "/no/such/file.txt"], "--data /no/such/file.txt: no such file or folder"),
    (["--model", "./no-such-model-dir"], "--model ./no-such-model-dir: no such directory"),
    (["--model", "nobody-org/no-such-model"], "--model nobody-org/no-such-model: cannot load"),
    (["--seq-len", "64", "--batch-size", "500"], "fewer than one batch of --batch-size 500"),
    (["--optimizer", "adamw", "--active-layers", "2"], "need --optimizer ist"),
    (["--ist-kwarg", "sampling=sideways"], "IST option rejected: Invalid sampling"),
])
def test_bad_input_one_line_exit_2(tiny_model_dir, corpus, tmp_path, capsys, extra, fragment):
    argv = ["--model", str(tiny_model_dir), "--data", str(corpus), "--steps", "1",
            "--batch-size", "2", "--seq-len", "16", "--no-progress",
            "--output-dir", str(tmp_path / "out"), *extra]
    code, _out, err = _run_main(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_end_to_end_tiny_model(tiny_model_dir, corpus, tmp_path, capsys):
    """The paper's settings (``--paper``): importance rounds from the first step."""
    out_dir = tmp_path / "out"
    code, out, _err = _run_main(
        ["--model", str(tiny_model_dir), "--data", str(corpus), "--steps", "3",
         "--batch-size", "2", "--seq-len", "16", "--update-interval", "1", "--paper",
         "--active-layers", "2", "--output-dir", str(out_dir), "--no-progress"], capsys)
    assert code == 0
    assert (out_dir / "adapter" / "adapter_config.json").is_file()
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (out_dir / "importance.png").stat().st_size > 1000
    results = (out_dir / "results.md").read_text()
    assert "| held-out loss |" in results and "| held-out perplexity |" in results
    assert "| recipe | `paper` |" in results and "| lr_schedule | `constant` |" in results
    summary = json.loads((out_dir / "results.json").read_text())
    assert summary["steps"] == 3 and len(summary["train_losses"]) == 3
    assert summary["lr"] == 1e-3
    assert [e[0] for e in summary["evals"]] == [0, 3]
    assert summary["train_cpu_seconds"] > 0 and summary["train_seconds"] > 0
    history = json.loads((out_dir / "importance.json").read_text())
    assert history["steps"] == [1, 2, 3] and all(len(t) == 2 for t in history["trained"])
    assert any(v != 0 for v in history["importance"][-1])  # importance rounds ran
    assert "held-out loss" in out and "total wall time" in out and "paper recipe" in out


def test_default_run_uses_the_measured_recipe(tiny_model_dir, corpus, tmp_path, capsys):
    """No flag: every layer for the first half of the steps, then uniform draws, the
    linear schedule with 10% warm-up and the measured rate; a flag the user sets wins."""
    out_dir = tmp_path / "out"
    code, out, _err = _run_main(
        ["--model", str(tiny_model_dir), "--data", str(corpus), "--steps", "8",
         "--batch-size", "2", "--seq-len", "16", "--active-layers", "2",
         "--output-dir", str(out_dir), "--no-progress"], capsys)
    assert code == 0, _err
    summary = json.loads((out_dir / "results.json").read_text())
    assert summary["lr"] == 4e-3
    assert summary["ist_kwargs"] == {"active_layers": 2, "sampling": "uniform", "dense_steps": 4}
    history = json.loads((out_dir / "importance.json").read_text())
    layers = history["num_layers"]
    assert [len(t) for t in history["trained"]] == [layers] * 4 + [2] * 4
    assert all(v == 0 for v in history["importance"][-1])  # uniform: no importance rounds
    # no importance was measured: the picture shows the layers trained, not an empty heatmap
    assert (out_dir / "layers-trained.png").is_file()
    assert not (out_dir / "importance.png").exists()
    results = (out_dir / "results.md").read_text()
    assert "| lr_schedule | `linear` |" in results and "| warmup_steps | `1` |" in results
    assert "measured recipe" in out
    assert "gemm_4bit_forward" not in _err and "kernels-community" not in _err
    code, _out, _err = _run_main(
        ["--model", str(tiny_model_dir), "--data", str(corpus), "--steps", "8",
         "--batch-size", "2", "--seq-len", "16", "--active-layers", "2", "--lr", "3e-4",
         "--dense-steps", "0", "--sampling", "importance", "--lr-schedule", "cosine",
         "--update-interval", "2", "--output-dir", str(tmp_path / "mine"), "--no-progress"],
        capsys)
    assert code == 0, _err
    summary = json.loads((tmp_path / "mine" / "results.json").read_text())
    assert summary["lr"] == 3e-4
    assert summary["ist_kwargs"] == {"active_layers": 2, "update_interval": 2,
                                     "sampling": "importance", "dense_steps": 0}
    results = (tmp_path / "mine" / "results.md").read_text()
    assert "| lr_schedule | `cosine` |" in results and "| warmup_steps | `1` |" in results


def test_compare_tiny_model(tiny_model_dir, corpus, tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    code, out, _err = _run_main(
        ["--model", str(tiny_model_dir), "--data", str(corpus), "--steps", "2",
         "--batch-size", "2", "--seq-len", "16", "--update-interval", "1", "--compare",
         "--output-dir", str(out_dir), "--no-progress"], capsys)
    assert code == 0
    table = (out_dir / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| lora")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "lora (all layers, AdamW)", "lora + IST", "lora + uniform"]
    before = {r.split("|")[2].strip() for r in rows}
    assert len(before) == 1  # same adapters init and held-out data for every method
    runs = [json.loads(line) for line in (out_dir / "compare.jsonl").read_text().splitlines()]
    assert [r["method"] for r in runs] == [r.split("|")[1].strip() for r in rows]
    assert all(r["optimizer_state_bytes"] > 0 and r["peak_bytes"] > 0 for r in runs)
    assert all(r["steps"] == 2 and r["seed"] == 0 for r in runs)
    # the saved run is "lora + IST" under the default recipe (uniform draws after the dense
    # phase): it measured no importance, so its picture is the layers trained
    assert (out_dir / "layers-trained.png").is_file() and (out_dir / "adapter").is_dir()
    assert "lora + uniform" in out


def test_import_is_light_and_module_entry_works():
    code = ("import sys, torch; before = set(sys.modules); import ist_optim, ist_optim.cli; "
            "new = set(sys.modules) - before; print(sorted(m for m in "
            "('transformers', 'peft', 'tqdm', 'matplotlib') if m in new))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"
    help_run = subprocess.run([sys.executable, "-m", "ist_optim", "--help"],
                              capture_output=True, text=True, cwd=REPO)
    assert help_run.returncode == 0 and "--active-layers" in help_run.stdout


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "ia3", "full"])
def test_add_adapters_methods_train_with_ist(method):
    from conftest import tiny_llama

    from ist_optim.cli.models import add_adapters

    model = add_adapters(tiny_llama(4), method, rank=2, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    if method == "full":
        assert all(".layers." in n for n in trainable)
    else:
        assert all(("lora_" in n) or ("ia3_" in n) for n in trainable)
    opt = build_optimizer("ist", model, lr=1e-2, seed=0, ist_kwargs={"update_interval": 1})
    model(**lm_batch()).loss.backward()
    opt.step()
    assert opt.last_round is not None  # the importance round ran with this adapter type


def test_add_adapters_rejects_unknown_method_and_rank():
    from conftest import tiny_llama

    from ist_optim.cli.models import add_adapters

    with pytest.raises(CLIError, match="--peft lokr: unknown method"):
        add_adapters(tiny_llama(2), "lokr")
    with pytest.raises(CLIError, match="--rank 0"):
        add_adapters(tiny_llama(2), "lora", rank=0)


def test_concurrent_conversion_keeps_the_first_finished_copy(tmp_path, monkeypatch):
    """Two processes converting the default model at once: the loser uses the winner's copy."""
    import transformers
    from conftest import tiny_llama

    from ist_optim.cli import models

    class FakeTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(models, "_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: tiny_llama(2))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: FakeTokenizer())
    target = tmp_path / "cache" / "SmolLM2-135M-Instruct-fp32"
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"winner": true}')  # the other process won
    models._convert_gguf(target)
    assert (target / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # temp copy removed


def _record_cuda_calls(monkeypatch) -> list[tuple[str, object]]:
    calls: list[tuple[str, object]] = []
    for name, value in (("reset_peak_memory_stats", None), ("memory_allocated", 3),
                        ("max_memory_allocated", 7), ("synchronize", None)):
        monkeypatch.setattr(torch.cuda, name,
                            lambda device=None, name=name, value=value:
                            calls.append((name, device)) or value)
    return calls


def test_peak_memory_reads_the_models_cuda_device(monkeypatch):
    """A model on cuda:1 is measured on cuda:1, not on the current device."""
    calls = _record_cuda_calls(monkeypatch)
    meter = PeakMemory("cuda:1")
    meter.reset()
    meter.synchronize()
    assert meter.peak_bytes() == 7 and meter.kind == "peak CUDA allocated"
    assert meter.growth_bytes() == 4  # above the 3 bytes allocated at the reset
    assert calls == [(name, torch.device("cuda", 1)) for name in
                     ("reset_peak_memory_stats", "memory_allocated", "synchronize",
                      "max_memory_allocated", "max_memory_allocated")]


def test_device_synchronizer_waits_for_that_device(monkeypatch):
    from ist_optim.cli.train import device_synchronizer

    calls = _record_cuda_calls(monkeypatch)
    device_synchronizer(torch.device("cpu"))()
    assert calls == []
    device_synchronizer(torch.device("cuda", 2))()
    assert calls == [("synchronize", torch.device("cuda", 2))]


def test_step_times_wait_for_the_device(monkeypatch):
    """On CUDA a step's kernels finish after its launches return: the time of a step
    runs until the device has finished it (here a synchronize that takes 50 ms)."""
    import time

    import ist_optim.cli.train as train_module

    waits = []

    def synchronizer(device):
        def wait():
            waits.append(device)
            time.sleep(0.05)
        return wait

    monkeypatch.setattr(train_module, "device_synchronizer", synchronizer)
    model = lora_model(2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = iter([lm_batch(seed=i) for i in range(3)])
    result = train_module.train(model, opt, batches, 3, progress=False)
    assert len(waits) == 6 and set(waits) == {torch.device("cpu")}
    assert min(result.step_seconds) >= 0.05


def test_the_harness_is_public_on_purpose_and_imported_on_first_use():
    """``ist_optim.cli`` names the pieces of its harness other code may reuse (the
    benchmarks do); importing it loads none of them, nor transformers."""
    import ist_optim.cli as cli
    from ist_optim.cli import runner, train

    assert cli.train_loop is train.train and cli.run_method is runner.run_method
    assert all(getattr(cli, name) is not None for name in cli.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        cli.nothing  # noqa: B018
    code = ("import sys, ist_optim.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('transformers', "
            "'ist_optim.cli.train', 'ist_optim.cli.runner'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_a_run_that_quantizes_nothing_shows_no_bitsandbytes_warning():
    """peft imports bitsandbytes when it is installed; on a CPU with AVX512-BF16 its import
    warns that a hub kernel cannot be fetched offline. A run with ``--quantize none`` uses
    no bitsandbytes, so ist-finetune keeps that warning out (its errors still show)."""
    code = ("import logging; logging.basicConfig(level=logging.INFO); {quiet}"
            "import peft, transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    plain = subprocess.run([sys.executable, "-c", code.format(quiet="")], env=env,
                           capture_output=True, text=True, timeout=300)
    if "gemm_4bit_forward" not in plain.stderr:
        pytest.skip("bitsandbytes does not warn at import on this machine")
    quiet = subprocess.run(
        [sys.executable, "-c", code.format(
            quiet="from ist_optim.cli import quiet_unused_libraries; "
                  "quiet_unused_libraries(); ")],
        env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "gemm_4bit_forward" not in quiet.stderr
    assert "publisher trust" not in quiet.stderr
