"""benchmarks/few_data.py and benchmarks/next_line.py: the play splits, the next-line
questions and their scoring, the run plan with its learning-rate choice, the paired report,
and one end-to-end run on a tiny random-init Llama (nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_llama_dir
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.few_data import epochs as few_data
from benchmarks.few_data import next_line

WORDS = ("love", "night", "crown", "sword", "grief", "honour", "fortune", "heaven", "blood",
         "king", "fair", "sweet", "death", "time", "heart", "eyes")


def _play(index: int) -> str:
    """A fake play: speaker headings, stage directions and lines of verse."""
    rng = __import__("random").Random(index)
    parts = []
    for speech in range(12):
        parts.append(("ROMEO", "JULIET", "NURSE")[speech % 3])
        for _ in range(6):
            parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 8))))
        parts.append("")
        if speech % 4 == 3:
            parts.append("Exit NURSE")
    return "\n".join(parts)


# --------------------------------------------------------------------------- next_line
def test_speech_lines_drop_headings_directions_and_short_lines():
    text = "HAMLET\nTo be, or not to be, that is\n[Aside] what a rogue\nExeunt all but two\nAy me"
    assert next_line.speech_lines(text) == [(1, "To be, or not to be, that is")]


@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(1, 4))
def test_questions_hold_the_true_next_line_among_distinct_choices(seed, choices, context):
    play = _play(seed % 7)
    questions = next_line.next_line_questions([play], 5, num_choices=choices,
                                              context_lines=context, seed=seed)
    lines = [line for _, line in next_line.speech_lines(play)]
    assert len(questions) == 5
    for q in questions:
        assert len(q.choices) == choices and len(set(q.choices)) == choices
        assert 0 <= q.answer < choices
        shown = q.context.rstrip("\n").split("\n")
        assert len(shown) == context
        k = next(i for i in range(len(lines)) if lines[i:i + context] == shown)
        assert lines[k + context] == q.choices[q.answer]  # the line that follows
    assert questions == next_line.next_line_questions([play], 5, num_choices=choices,
                                                      context_lines=context, seed=seed)


def test_questions_reject_bad_counts():
    with pytest.raises(ValueError, match="num_choices=1"):
        next_line.next_line_questions(["a b c d e"], 2, num_choices=1)
    with pytest.raises(ValueError, match="per_text=0"):
        next_line.next_line_questions(["a b c d e"], 0)


@given(st.lists(st.lists(st.floats(0, 10), min_size=3, max_size=3), min_size=1, max_size=20),
       st.data())
def test_accuracy_is_the_share_of_argmin_hits(rows, data):
    answers = data.draw(st.lists(st.integers(0, 2), min_size=len(rows), max_size=len(rows)))
    losses = torch.tensor(rows, dtype=torch.float64)
    expected = sum(min(range(3), key=lambda j, r=r: (r[j], j)) == a
                   for r, a in zip(rows, answers, strict=True)) / len(rows)
    assert next_line.accuracy(losses, answers) == pytest.approx(expected)
    with pytest.raises(ValueError, match="rows of losses"):
        next_line.accuracy(losses, answers + [0])


class _Scorer(torch.nn.Module):
    """A 'model' whose next-token distribution puts probability 0.9 on token 7 everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = torch.full((*input_ids.shape, 10), 0.0)
        logits[..., 7] = torch.log(torch.tensor(0.9 * 9 / 0.1))
        return type("Out", (), {"logits": logits + self.w})()


class _Tokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [7 if ch == "x" else 3 for ch in text]}


def test_choice_losses_score_only_the_choice_tokens():
    q = next_line.Question("yyyy\n", ("xx", "yx", "xxxx"), 0)
    losses = next_line.choice_losses(_Scorer(), _Tokenizer(), [q], context_tokens=3,
                                     batch_size=2)
    # choice tokens (with the newline, token 3): p(7) = 0.9, p(3) = 0.1 / 9
    lp7, lp3 = -torch.log(torch.tensor(0.9)), -torch.log(torch.tensor(0.1 / 9))
    expected = torch.tensor([(2 * lp7 + lp3) / 3, (lp7 + 2 * lp3) / 3, (4 * lp7 + lp3) / 5])
    torch.testing.assert_close(losses, expected.view(1, 3))


# --------------------------------------------------------------------------- few_data
def _rec(method, lr, seed, vals, tests, acc=0.5):
    per_epoch = [{"epoch": e, "step": e, "val": v, "test": t, "train": 3.0}
                 for e, (v, t) in enumerate(zip(vals, tests, strict=True))]
    return {"method": method, "lr": lr, "seed": seed, "per_epoch": per_epoch, "epochs": 2,
            "train_blocks": 8, "seq_len": 16, "batch_size": 4, "questions": 4,
            "accuracy": acc, "accuracy_before": 0.25, "cpu_seconds_per_step": 1.0}


def test_plan_sweeps_first_then_runs_the_chosen_rate_on_every_seed():
    grids = {"a": (1.0, 2.0), "b": (1.0, 2.0), "c": ()}
    first = few_data.plan(["a", "b", "c"], grids, [0, 1], 0, [], {"c": "b"})
    assert first == [("a", 1.0, 0), ("a", 2.0, 0), ("b", 1.0, 0), ("b", 2.0, 0)]
    done = [_rec("a", 1.0, 0, [5, 4.0], [5, 9]), _rec("a", 2.0, 0, [5, 4.5], [5, 1]),
            _rec("b", 1.0, 0, [5, 4.5], [5, 1]), _rec("b", 2.0, 0, [5, 4.0], [5, 9])]
    # chosen on validation (a: 1.0, b: 2.0) though the test loss says otherwise; c takes b's
    assert few_data.plan(["a", "b", "c"], grids, [0, 1], 0, done, {"c": "b"}) == [
        ("a", 1.0, 1), ("b", 2.0, 1), ("c", 2.0, 0), ("c", 2.0, 1)]


def test_report_pairs_each_seed_with_the_baseline():
    runs = [_rec("lora", 1.0, 0, [5, 4.0, 4.1], [5, 4.0, 4.2], 0.50),
            _rec("lora", 1.0, 1, [5, 4.0, 4.1], [5, 4.1, 4.3], 0.50),
            _rec("ist", 2.0, 0, [5, 4.2, 4.0], [5, 4.1, 3.9], 0.75),
            _rec("ist", 2.0, 1, [5, 4.2, 4.0], [5, 4.4, 4.35], 0.25)]
    diffs = few_data.paired(runs, "lora", lambda r: r["per_epoch"][-1]["test"])
    assert diffs["ist"] == pytest.approx({0: -0.3, 1: 0.05})
    assert few_data.best(runs[0]) == (4.0, 1)
    text = few_data.report(runs)
    line = next(s for s in text.splitlines() if s.startswith("| final test loss | ist"))
    assert "-0.3000, +0.0500" in line and line.rstrip().endswith("| 1/2 |")
    acc = next(s for s in text.splitlines() if s.startswith("| accuracy (points) | ist"))
    assert "+25.0, -25.0" in acc


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """Ten fake plays and a 4-layer random Llama with a byte-level BPE tokenizer."""
    plays = tmp_path_factory.mktemp("plays")
    for i in range(10):
        (plays / f"play{i}.txt").write_text(_play(i))
    folder = save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"),
                                 [_play(i) for i in range(10)])
    return folder, plays


def test_end_to_end_sweep_seeds_resume_report_and_plot(tiny_setup, tmp_path):
    model, plays = tiny_setup
    out = tmp_path / "runs.jsonl"
    args = ["--model", str(model), "--data", str(plays), "--methods", "lora", "lora+ist",
            "lora+uniform", "--lrs", "lora=1e-3,1e-2", "--lrs", "lora+ist=1e-2",
            "--same-lr-as", "lora+uniform=lora+ist", "--seeds", "0", "1", "--epochs", "2",
            "--train-blocks", "8", "--seq-len", "16", "--batch-size", "4",
            "--eval-blocks", "8", "--eval-batch", "4", "--val-plays", "2",
            "--questions-per-play", "3", "--context-tokens", "8", "--rank", "2",
            "--out", str(out), "--table", str(tmp_path / "t.md"),
            "--plot", str(tmp_path / "c.png")]
    rng_state = torch.random.get_rng_state()
    assert few_data.main(args + ["--max-runs", "2"]) == 0
    assert len(out.read_text().splitlines()) == 2  # cut after two runs ...
    assert few_data.main(args) == 0  # ... and resumed: lora's 2 sweep runs, then the chosen
    assert torch.equal(rng_state, torch.random.get_rng_state())  # rates (one-rate: no sweep)
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    chosen_lora = few_data.choose_lrs(runs, 0)["lora"]
    assert [(r["method"], r["lr"], r["seed"]) for r in runs] == [
        ("lora", 1e-3, 0), ("lora", 1e-2, 0), ("lora", chosen_lora, 1), ("lora+ist", 1e-2, 0),
        ("lora+ist", 1e-2, 1), ("lora+uniform", 1e-2, 0), ("lora+uniform", 1e-2, 1)]
    for r in runs:
        assert [e["epoch"] for e in r["per_epoch"]] == [0, 1, 2] and r["steps"] == 4
        assert 0.0 <= r["accuracy"] <= 1.0 and r["questions"] == 3
    # LoRA + IST and uniform share seed, rate and (before the first importance round at
    # step 10) the active sets, so their 4 steps are identical.
    ist, uni = runs[3], runs[5]
    assert [e["test"] for e in ist["per_epoch"]] == [e["test"] for e in uni["per_epoch"]]
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "Paired differences vs lora" in (tmp_path / "t.md").read_text()


def test_epoch_zero_scores_are_those_of_every_freshly_adapted_model(tiny_setup):
    # base_scores() is computed once on the plain model and used as epoch 0 of every run:
    # valid because LoRA starts with B = 0 and full fine-tuning starts from the same weights.
    model, plays = tiny_setup
    args = few_data.build_parser().parse_args([
        "--model", str(model), "--data", str(plays), "--train-blocks", "8", "--seq-len", "16",
        "--eval-blocks", "8", "--eval-batch", "4", "--questions-per-play", "3",
        "--context-tokens", "8"])
    setup = few_data.prepare(args)
    base = few_data.base_scores(setup)
    for peft in ("lora", "full"):
        adapted = few_data.pretrained(str(model), peft, rank=2, seed=5)
        assert setup.loss(adapted, "test") == base["test"]
        assert setup.loss(adapted, "val") == base["val"]
        assert few_data._accuracy(adapted, setup) == base["accuracy"]


def test_main_refuses_blocks_that_do_not_fill_epochs(capsys):
    assert few_data.main(["--train-blocks", "10", "--batch-size", "4"]) == 2
    assert "not a multiple" in capsys.readouterr().err


def test_report_refuses_runs_of_another_protocol(tmp_path, capsys):
    runs = [_rec("lora", 1.0, 0, [5, 4.0, 4.1], [5, 4.0, 4.2]),
            {**_rec("ist", 1.0, 0, [5, 4.0, 4.1], [5, 4.0, 4.2]), "epochs": 3}]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert few_data.main(["--report", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the rows mix protocols: epochs 2 / 3" in err and "--group-by epochs" in err
    path.write_text(json.dumps(runs[0]) + "\n")
    assert few_data.main(["--report", str(path), str(path)]) == 2
    assert "the run ('lora', 1.0, 0) is in the rows twice" in capsys.readouterr().err
