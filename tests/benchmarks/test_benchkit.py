"""benchmarks/benchkit: the model builders, the data split and blocks, the JSONL rows and
the memory anchors the benchmark scripts share."""

from __future__ import annotations

import doctest

import pytest
import torch
from conftest import load_benchmark

data = load_benchmark("benchkit.data")
models = load_benchmark("benchkit.models")
report = load_benchmark("benchkit.report")


@pytest.mark.parametrize("module", [data, models, report], ids=lambda m: m.__name__)
def test_the_examples_hold(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def test_split_plays_are_disjoint_and_cover_everything():
    train, val, test = data.split_plays([str(i) for i in range(38)], 0.1, 2)
    assert test == [4, 14, 23, 33]  # the held-out plays of quality.py
    assert sorted(train + val + test) == list(range(38)) and len(val) == 2


def test_pick_blocks_random_subset_is_seeded_and_sorted():
    tokens = torch.arange(100)
    a = data.pick_blocks(tokens, 5, 6, torch.Generator().manual_seed(3))
    b = data.pick_blocks(tokens, 5, 6, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (6, 5)
    starts = a[:, 0].tolist()
    assert starts == sorted(starts) and all(s % 5 == 0 for s in starts)
    with pytest.raises(data.CLIError, match="asked for 30 blocks"):
        data.pick_blocks(tokens, 5, 30)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_random_llama_is_seeded_and_leaves_the_global_rng_alone():
    config = models.llama_config(2, 64, vocab=128)
    state = torch.random.get_rng_state()
    a = models.random_llama(config, seed=3, lora_rank=4)
    b = models.random_llama(config, seed=3, lora_rank=4)
    c = models.random_llama(config, seed=4, lora_rank=4)
    assert torch.equal(state, torch.random.get_rng_state())
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert not torch.equal(wa["base_model.model.model.embed_tokens.weight"],
                           wc["base_model.model.model.embed_tokens.weight"])
    lora = {n.split(".")[-4] for n in wa if "lora_A" in n}
    assert lora == set(models.LORA_TARGETS)
    # LoRA from its own seed: the same base weights, other adapters
    d = _weights(models.random_llama(config, seed=3, lora_rank=4, lora_seed=9))
    assert all(torch.equal(wa[n], d[n]) for n in wa if "lora_" not in n)
    assert not all(torch.equal(wa[n], d[n]) for n in wa if "lora_A" in n)


def test_block_loader_batches_blocks_in_order_and_heldout_loss_is_their_mean():
    blocks = torch.arange(36).view(6, 6) % 128
    batches = data.block_loader(blocks, 2, "cpu")
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 6)] * 3
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), blocks)
    assert all(torch.equal(b["labels"], b["input_ids"]) for b in batches)
    assert len(data.block_loader(blocks, 4)) == 1  # whole batches only
    model = models.random_llama(models.llama_config(2, 64, vocab=128), seed=0)
    losses = [data.heldout_loss(model, blocks[i:i + 3], 3) for i in (0, 3)]
    assert data.heldout_loss(model, blocks, 3) == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_rows_are_appended_one_json_line_each_and_read_back(tmp_path):
    path = tmp_path / "runs.jsonl"
    assert report.read_rows([path]) == []  # a first run: no file yet
    report.append_row(path, {"a": 1})
    report.append_row(path, {"b": [1.5]})
    assert report.read_rows([path, tmp_path / "missing.jsonl"]) == [{"a": 1}, {"b": [1.5]}]
    assert path.read_text().count("\n") == 2
