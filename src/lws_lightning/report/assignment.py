"""Pictures of an assignment and of π, the assignment probabilities."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_assignment(
    assignment: Sequence[Sequence[int]],
    task_names: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Save the picture of ``assignment`` ([layers][tasks] bank indices) to ``path``.

    Within a column, tasks that share a bank share a colour and show the same bank number.
    """
    banks = np.asarray(assignment, dtype=int).T  # rows are tasks
    num_tasks, num_layers = banks.shape
    num_colours = int(banks.max()) + 1
    palette = plt.get_cmap("tab20" if num_colours > 10 else "tab10")
    colours = ListedColormap([palette(i % palette.N) for i in range(num_colours)])

    fig, ax = plt.subplots(
        figsize=(max(4.5, 1.5 + 0.7 * num_layers), 1.2 + 0.32 * num_tasks), constrained_layout=True
    )
    ax.imshow(banks, cmap=colours, vmin=-0.5, vmax=num_colours - 0.5, aspect="auto")
    if num_tasks * num_layers <= 400:
        for (task, layer), bank in np.ndenumerate(banks):
            ax.text(layer, task, str(bank), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(num_layers), [f"L{layer}" for layer in range(num_layers)])
    ax.set_yticks(range(num_tasks), list(task_names))
    ax.set_xlabel("shareable layer")
    ax.set_ylabel("task")
    ax.set_title(title or "most likely assignment\n(cell = bank)", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def probs_figure(
    probs: Sequence[Sequence[Sequence[float]]],
    task_names: Sequence[str],
    title: str | None = None,
) -> Figure:
    """Draw π as one heatmap per shareable layer: tasks as rows, banks as columns.

    ``probs`` is [layers][tasks][banks], each layer's rows cut to its own bank count;
    zero-padded columns would show up as banks of probability 0. The caller owns the returned
    figure and should close it.
    """
    layers = [np.asarray(layer, dtype=float) for layer in probs]
    if not layers:
        raise ValueError("probs is empty: expected one [tasks][banks] table per shareable layer.")
    num_tasks = layers[0].shape[0]
    max_banks = max(layer.shape[1] for layer in layers)

    fig, axes = plt.subplots(
        1,
        len(layers),
        figsize=(1.2 + len(layers) * (0.6 + 0.45 * max_banks), 1.2 + 0.32 * num_tasks),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for index, (ax, layer) in enumerate(zip(axes[0], layers, strict=True)):
        image = ax.imshow(layer, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        if layer.size <= 200:
            for (task, bank), value in np.ndenumerate(layer):
                colour = "black" if value > 0.6 else "white"
                ax.text(
                    bank, task, f"{value:.2f}", ha="center", va="center", fontsize=6, color=colour
                )
        ax.set_xticks(range(layer.shape[1]))
        ax.set_xlabel("bank")
        ax.set_title(f"L{index}", fontsize=9)
        if index == 0:
            ax.set_yticks(range(num_tasks), list(task_names))
            ax.set_ylabel("task")
        else:
            ax.set_yticks([])
    fig.colorbar(image, ax=axes[0].tolist(), label="π (probability)", shrink=0.9)
    fig.suptitle(title or "π: probability of each bank per layer and task", fontsize=10)
    return fig


def plot_probs(
    probs: Sequence[Sequence[Sequence[float]]],
    task_names: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Save the heatmaps of π (see :func:`probs_figure`) to ``path``."""
    fig = probs_figure(probs, task_names, title=title)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` with Agg into an RGB array ([height, width, 3], uint8) and close it."""
    try:
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(fig)


def figure_to_png(fig: Figure, dpi: int = 120) -> bytes:
    """Render ``fig`` into PNG bytes and close it; for display where no backend shows figures."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()
