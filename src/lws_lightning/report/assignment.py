"""Picture of an assignment: tasks as rows, shareable layers as columns, cells coloured by bank."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402


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
        figsize=(1.0 + 0.7 * num_layers, 1.0 + 0.32 * num_tasks), constrained_layout=True
    )
    ax.imshow(banks, cmap=colours, vmin=-0.5, vmax=num_colours - 0.5, aspect="auto")
    if num_tasks * num_layers <= 400:
        for (task, layer), bank in np.ndenumerate(banks):
            ax.text(layer, task, str(bank), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(num_layers), [f"L{layer}" for layer in range(num_layers)])
    ax.set_yticks(range(num_tasks), list(task_names))
    ax.set_xlabel("shareable layer")
    ax.set_ylabel("task")
    ax.set_title(title or "most likely assignment (cell = bank)")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
