"""Pictures of IST runs (optional ``matplotlib`` extra: ``pip install ist-optim[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .history import ImportanceHistory

__all__ = ["plot_importance"]


def plot_importance(
    history: ImportanceHistory,
    path: str | Path | None = None,
    *,
    layer_labels: list[str] | None = None,
    title: str = "IST layer importance",
) -> Any:
    """Heatmap of importance over steps x layers, beside how often each layer trained.

    Args:
        history: what :class:`ist_optim.ImportanceHistory` recorded.
        path: where to write a PNG; ``None`` only returns the figure.
        layer_labels: tick labels for the layers (default: their indices).
        title: the figure title.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: when matplotlib is not installed, naming the extra to install.
        ValueError: when the history holds no record.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_importance needs matplotlib: pip install 'ist-optim[plot]'"
        ) from err
    if not history.steps:
        raise ValueError("the history is empty; record(opt, ...) after each step first")
    matrix = history.importance_matrix().numpy()
    counts = history.train_counts().numpy()
    fig, (ax_map, ax_bar) = plt.subplots(
        1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 1]}, constrained_layout=True
    )
    image = ax_map.imshow(
        matrix.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
        extent=(history.steps[0] - 0.5, history.steps[-1] + 0.5, -0.5, history.num_layers - 0.5),
    )
    ax_map.set_xlabel("optimizer step")
    ax_map.set_ylabel("layer")
    ax_map.set_title(title)
    fig.colorbar(image, ax=ax_map, label="importance (higher = more important)")
    ax_bar.barh(range(history.num_layers), counts, color="tab:orange")
    ax_bar.set_xlabel("steps trained")
    ax_bar.set_ylim(-0.5, history.num_layers - 0.5)
    if layer_labels is not None:
        for ax in (ax_map, ax_bar):
            ax.set_yticks(range(history.num_layers), layer_labels, fontsize=7)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
