"""plot_importance: a PNG of a real (tiny) IST run, drawn to scale."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, lora_model

from ist_optim import ImportanceHistory, ISTOptimizer, plot_importance

plt = pytest.importorskip("matplotlib.pyplot")


def run_history(steps: int = 12) -> ImportanceHistory:
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=1,
                       update_interval=3)
    history = ImportanceHistory(opt.num_layers)
    for step in range(steps):
        trained = opt.active_layers
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        history.record(opt, trained)
    return history


def test_writes_a_png_of_the_run(tmp_path):
    history = run_history()
    fig = plot_importance(history, tmp_path / "importance.png",
                          layer_labels=[f"L{i}" for i in range(4)])
    try:
        data = (tmp_path / "importance.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = plt.imread(tmp_path / "importance.png")
        assert image.shape[:2] == (int(4.5 * 110), 11 * 110)
        ax_map, ax_bar = fig.axes[:2]
        assert [t.get_text() for t in ax_map.get_yticklabels()] == ["L0", "L1", "L2", "L3"]
        bars = [patch.get_width() for patch in ax_bar.patches]
        assert bars == history.train_counts().tolist() and sum(bars) == 12
        mesh = ax_map.collections[0]
        values = torch.as_tensor(mesh.get_array()).reshape(4, 12)  # layers x records
        assert torch.equal(values.float(), history.importance_matrix().T)
        low, high = mesh.get_clim()
        assert low == -high and high == pytest.approx(history.importance_matrix().abs().max())
        dots = ax_map.collections[1].get_offsets()
        assert len(dots) == 12  # one trained layer per step
    finally:
        plt.close(fig)


def test_records_every_k_steps_are_drawn_to_scale():
    history = ImportanceHistory(2, steps=[10, 20, 40], importance=[[0, 0], [.1, -.1], [.2, 0]],
                                trained=[[0], [1], [0]])
    fig = plot_importance(history, show_trained=False)
    try:
        ax_map = fig.axes[0]
        assert ax_map.get_xlim() == (9.0, 40.0)
        assert len(ax_map.collections) == 1  # no dots
    finally:
        plt.close(fig)


def test_refuses_an_empty_history_and_wrong_labels():
    with pytest.raises(ValueError, match="empty"):
        plot_importance(ImportanceHistory(3))
    history = ImportanceHistory(2, steps=[1], importance=[[0, 0]], trained=[[0]])
    with pytest.raises(ValueError, match="3 labels for 2 layers"):
        plot_importance(history, layer_labels=["a", "b", "c"])
