"""Figures over runs: sharing-group sizes, test error over iterations and π's entropy.

The group-size bars follow Figures 3 and 4 and the error curves Figure 5 of Prellberg & Kramer,
"Learned Weight Sharing for Deep Multi-Task Learning by Natural Evolution Strategy and
Stochastic Gradient Descent", IJCNN 2020.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lws_lightning.report.runs import Run  # noqa: E402
from lws_lightning.report.tables import SHARING_LABELS, sharing_modes  # noqa: E402

log = logging.getLogger(__name__)

ENTROPY_KEY = "routing/entropy"
ENTROPY_LAYER_KEY = re.compile(r"^routing/entropy/layer_(\d+)$")


def group_size_shares(assignments: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """Share of tasks whose bank is shared by exactly t tasks, per layer, over all assignments.

    Args:
        assignments: Assignments of equal shape [layers][tasks], one per run.

    Returns:
        Array of shape [layers, tasks]; entry [l, t - 1] is the fraction of (run, task) pairs
        whose bank in layer l is used by exactly t tasks. Each row sums to 1.
    """
    stacked = np.asarray(assignments, dtype=int)
    if stacked.ndim != 3 or stacked.shape[0] == 0:
        raise ValueError(
            f"Expected assignments of shape [runs][layers][tasks], got {stacked.shape}."
        )
    num_runs, num_layers, num_tasks = stacked.shape
    counts = np.zeros((num_layers, num_tasks))
    for assignment in stacked:
        for layer, banks in enumerate(assignment):
            users = Counter(banks.tolist())
            for bank in banks:
                counts[layer, users[bank] - 1] += 1
    return counts / (num_runs * num_tasks)


def plot_group_sizes(shares: np.ndarray, path: str | Path, title: str) -> Path:
    """Save grouped bars of :func:`group_size_shares`: one group per layer, one bar per size t."""
    num_layers, num_tasks = shares.shape
    width = 0.8 / num_tasks
    fig, ax = plt.subplots(
        figsize=(2.0 + 0.5 * num_layers * min(num_tasks, 8), 3.2), constrained_layout=True
    )
    palette = plt.get_cmap("viridis")
    positions = np.arange(num_layers)
    for size in range(1, num_tasks + 1):
        colour = palette((size - 1) / max(num_tasks - 1, 1))
        ax.bar(
            positions - 0.4 + (size - 0.5) * width,
            shares[:, size - 1],
            width,
            label=f"{size}",
            color=colour,
        )
    ax.set_xticks(positions, [f"L{layer}" for layer in range(num_layers)])
    ax.set_xlabel("shareable layer")
    ax.set_ylabel("share of tasks")
    ax.set_ylim(0, 1)
    ax.legend(title="tasks sharing the bank", fontsize=7, title_fontsize=7, ncols=min(num_tasks, 6))
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


@dataclass(frozen=True)
class ErrorCurve:
    """Test error over iterations of one sharing mode: mean and sample std over runs."""

    sharing: str
    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    num_runs: int


def error_curves(runs: Sequence[Run]) -> list[ErrorCurve]:
    """Average the ``history`` errors of ``runs`` per sharing mode, at steps all its runs have.

    A mode whose runs share no evaluation step gets no curve.
    """
    curves = []
    for mode in sharing_modes(runs):
        histories = [
            {int(entry["step"]): float(entry["error"]) for entry in run.results["history"]}
            for run in runs
            if run.sharing == mode
        ]
        common = sorted(set.intersection(*(set(history) for history in histories)))
        if not common:
            log.warning("The %s runs have no evaluation step in common; no curve drawn.", mode)
            continue
        values = np.array([[history[step] for step in common] for history in histories])
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(common))
        curves.append(
            ErrorCurve(mode, np.array(common), values.mean(axis=0), std, num_runs=len(values))
        )
    return curves


def plot_error_curves(curves: Sequence[ErrorCurve], path: str | Path, title: str) -> Path:
    """Save the test error (%) over iterations, one line per mode with a ±1 std band over runs."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5), constrained_layout=True)
    for curve in curves:
        mean, std = 100 * curve.mean, 100 * curve.std
        label = f"{SHARING_LABELS.get(curve.sharing, curve.sharing)} (n={curve.num_runs})"
        (line,) = ax.plot(
            curve.steps, mean, label=label, marker="o" if len(curve.steps) < 20 else None
        )
        if curve.num_runs > 1:
            ax.fill_between(curve.steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test error (%)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read Lightning's ``metrics.csv`` into (step, value) series per metric key.

    CSVLogger writes one row per logging step with empty cells for metrics not logged at that
    step; those cells are skipped.
    """
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with Path(path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                number = float(value)
                if math.isfinite(number):
                    series[key].append((int(float(step)), number))
    return dict(series)


def entropy_series(run_dir: str | Path) -> tuple[dict[str, list[tuple[int, float]]], Path]:
    """Return a run's entropy series of π and the file they come from.

    ``csv/metrics.csv`` (CSVLogger) contains ``routing/entropy/layer_<l>`` at every logged
    iteration. Without it, or when the run ended before its first logged iteration, the
    series come from ``history`` in ``results.json``, which has only the mean over layers
    (``routing/entropy``) at each evaluation.
    """
    run_dir = Path(run_dir)
    metrics_csv = run_dir / "csv" / "metrics.csv"
    if metrics_csv.is_file():
        series = read_metrics_csv(metrics_csv)
        entropy = {key: values for key, values in series.items() if key.startswith(ENTROPY_KEY)}
        if any(entropy.values()):
            return entropy, metrics_csv
    results_path = run_dir / "results.json"
    history = json.loads(results_path.read_text()).get("history", [])
    entropy = {ENTROPY_KEY: [(int(entry["step"]), float(entry["entropy"])) for entry in history]}
    return entropy, results_path


def entropy_figure(series: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Draw π's entropy over iterations: one line per ``routing/entropy/layer_<l>`` series.

    Without per-layer series, the figure shows ``routing/entropy``, the mean over layers.
    The caller owns the returned figure and should close it.
    """
    lines = sorted(
        (int(match.group(1)), f"L{match.group(1)}", key)
        for key in series
        if (match := ENTROPY_LAYER_KEY.match(key)) is not None
    )
    if not lines and series.get(ENTROPY_KEY):
        lines = [(0, "mean over layers", ENTROPY_KEY)]
    if not lines:
        raise ValueError(
            f"No {ENTROPY_KEY} or {ENTROPY_KEY}/layer_<l> series found; the run logged no "
            "entropy of π."
        )
    fig, ax = plt.subplots(figsize=(5.5, 3.2), constrained_layout=True)
    for _, label, key in lines:
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean entropy of π over tasks (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="layer", title_fontsize=8)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
