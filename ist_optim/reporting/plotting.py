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
    show_trained: bool | None = None,
) -> Any:
    """Heatmap of importance over steps x layers, beside how often each layer trained.

    Importance is signed (0 = neutral, the start), so the colour map diverges around 0:
    red = more important, blue = less. Each record covers the steps since the previous
    one, so histories recorded every k steps or resumed mid-run are drawn to scale. A
    history that measured no importance (every value 0: uniform draws run no rounds) is
    drawn as the layers trained at each step instead, and the title says so.

    Args:
        history: what :class:`ist_optim.ImportanceHistory` recorded.
        path: where to write a PNG; ``None`` only returns the figure.
        layer_labels: tick labels for the layers (default: their indices).
        title: the figure title.
        show_trained: mark the layers trained at each record with dots; ``None`` does it
            for histories of at most 400 records (beyond, dots only clutter).

    Returns:
        The ``matplotlib.figure.Figure`` (close it with ``plt.close(fig)`` when done).

    Raises:
        ImportError: when matplotlib is not installed, naming the extra to install.
        ValueError: when the history holds no record, or ``layer_labels`` has another
            length than the number of layers.

    Example:
        >>> from ist_optim import ImportanceHistory
        >>> history = ImportanceHistory(3, steps=[1, 2], importance=[[0, 0, 0], [.1, 0, -.1]],
        ...                             trained=[[0], [2]])
        >>> fig = plot_importance(history)
        >>> [ax.get_xlabel() for ax in fig.axes[:2]]
        ['optimizer step', 'steps trained (of 2)']
        >>> uniform = ImportanceHistory(3, steps=[1, 2], importance=[[0] * 3] * 2,
        ...                             trained=[[0], [2]])
        >>> plot_importance(uniform, title="run").axes[0].get_title()
        'run: layers trained per step (no importance measured)'
        >>> import matplotlib.pyplot as plt; plt.close("all")
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
    num_layers = history.num_layers
    if layer_labels is not None and len(layer_labels) != num_layers:
        raise ValueError(
            f"layer_labels has {len(layer_labels)} labels for {num_layers} layers"
        )
    matrix = history.importance_matrix().numpy()
    counts = history.train_counts().numpy()
    steps = list(history.steps)
    x_edges = [steps[0] - 1, *steps]
    y_edges = [i - 0.5 for i in range(num_layers + 1)]
    measured = bool(abs(matrix).max() > 0)
    fig, (ax_map, ax_bar) = plt.subplots(
        1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 1]}, constrained_layout=True,
        sharey=True,
    )
    if not measured:  # nothing to colour by importance: the trained layers themselves
        trained = [[1.0 if layer in layers else 0.0 for layer in range(num_layers)]
                   for layers in history.trained]
        ax_map.pcolormesh(x_edges, y_edges, list(map(list, zip(*trained, strict=True))),
                          cmap="Greys", vmin=0.0, vmax=1.5, shading="flat")
        title = f"{title}: layers trained per step (no importance measured)"
        show_trained = False
    else:
        limit = float(abs(matrix).max())
        mesh = ax_map.pcolormesh(x_edges, y_edges, matrix.T, cmap="coolwarm", vmin=-limit,
                                 vmax=limit, shading="flat")
        fig.colorbar(mesh, ax=ax_map, label="importance (red = more important)", pad=0.01)
    if show_trained if show_trained is not None else len(steps) <= 400:
        xs = [step - 0.5 for step, layers in zip(steps, history.trained, strict=True)
              for _ in layers]
        ys = [layer for layers in history.trained for layer in layers]
        ax_map.scatter(xs, ys, s=6, c="black", marker="o", linewidths=0, label="trained")
        ax_map.legend(loc="upper left", fontsize=7, framealpha=0.8, markerscale=1.5)
    ax_map.set_xlabel("optimizer step")
    ax_map.set_ylabel("layer")
    ax_map.set_title(title)
    ax_map.set_ylim(-0.5, num_layers - 0.5)
    ax_bar.barh(range(num_layers), counts, color="tab:gray")
    ax_bar.set_xlabel(f"steps trained (of {len(steps)})")
    ax_bar.set_title("training frequency")
    ticks = layer_labels if layer_labels is not None else [str(i) for i in range(num_layers)]
    if num_layers <= 40:
        ax_map.set_yticks(range(num_layers), ticks, fontsize=7 if num_layers > 16 else 9)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
