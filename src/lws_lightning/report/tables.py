"""Markdown tables of the report: test errors, significance tests and weight counts."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import mannwhitneyu

from lws_lightning.report.runs import Run, SkippedRun

# Row order of the error table: the two baselines, then learned sharing, as in Table I of
# Prellberg & Kramer (IJCNN 2020). Other modes follow in name order.
SHARING_ORDER = ("full", "none", "learned", "fixed")
SHARING_LABELS = {
    "full": "full sharing",
    "none": "no sharing",
    "learned": "learned sharing",
    "fixed": "fixed assignment",
}
BASELINES = ("full", "none")
# results.json keys whose values must agree among the runs of one table cell, with labels.
POOLED_SETTINGS = {"steps": "training steps", "banks_per_layer": "banks per layer"}


@dataclass(frozen=True)
class Comparison:
    """One-sided Mann–Whitney U test of learned sharing's errors against one baseline's.

    ``p_value`` and ``statistic`` are None when either side has no runs.
    """

    experiment: str
    baseline: str
    learned_runs: int
    baseline_runs: int
    statistic: float | None
    p_value: float | None

    @property
    def min_p_value(self) -> float | None:
        """Smallest p-value the exact test can give for these sample sizes, 1 / C(n1+n2, n1)."""
        if not self.learned_runs or not self.baseline_runs:
            return None
        return 1.0 / math.comb(self.learned_runs + self.baseline_runs, self.learned_runs)


def experiments(runs: Sequence[Run]) -> list[str]:
    """Return the experiment names of ``runs`` in sorted order."""
    return sorted({run.experiment for run in runs})


def sharing_modes(runs: Sequence[Run]) -> list[str]:
    """Return the sharing modes of ``runs``, baselines first (see :data:`SHARING_ORDER`)."""
    modes = {run.sharing for run in runs}
    known = [mode for mode in SHARING_ORDER if mode in modes]
    return known + sorted(modes - set(SHARING_ORDER))


def runs_by_cell(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    """Group ``runs`` by table cell: (experiment, sharing mode)."""
    cells: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        cells[(run.experiment, run.sharing)].append(run)
    return dict(cells)


def errors_by_cell(runs: Sequence[Run]) -> dict[tuple[str, str], list[float]]:
    """Group the example-weighted test errors by (experiment, sharing mode)."""
    cells = runs_by_cell(runs)
    return {cell: [run.error for run in cell_runs] for cell, cell_runs in cells.items()}


def error_table(runs: Sequence[Run]) -> str:
    """Table I: sharing modes as rows, experiments as columns, test error in percent.

    Each cell is the mean ± the sample standard deviation over the cell's runs (seeds), with
    the run count n. The lowest mean of each column is bold when the column has several rows.
    """
    names = experiments(runs)
    modes = sharing_modes(runs)
    cells = errors_by_cell(runs)
    best = {}
    for experiment in names:
        means = {
            mode: float(np.mean(cells[(experiment, mode)]))
            for mode in modes
            if (experiment, mode) in cells
        }
        if len(means) > 1:
            best[experiment] = min(means, key=means.__getitem__)

    lines = [_row(["sharing", *names]), _row(["---"] * (len(names) + 1))]
    for mode in modes:
        row = [_sharing_label(mode)]
        for experiment in names:
            values = cells.get((experiment, mode))
            text = _mean_std(values) if values else "—"
            if values and best.get(experiment) == mode:
                text = f"**{text}**"
            row.append(text)
        lines.append(_row(row))
    return "\n".join(lines)


def compare_learned(runs: Sequence[Run]) -> list[Comparison]:
    """Test, per experiment, whether learned sharing has lower test errors than each baseline.

    Uses scipy's ``mannwhitneyu`` with ``alternative="less"``, so a small p-value means
    learned sharing's errors tend to be lower than the baseline's.
    """
    cells = errors_by_cell(runs)
    comparisons = []
    for experiment in experiments(runs):
        learned = cells.get((experiment, "learned"), [])
        for baseline in BASELINES:
            other = cells.get((experiment, baseline), [])
            statistic = p_value = None
            if learned and other:
                result = mannwhitneyu(learned, other, alternative="less")
                statistic, p_value = float(result.statistic), float(result.pvalue)
            comparisons.append(
                Comparison(experiment, baseline, len(learned), len(other), statistic, p_value)
            )
    return comparisons


def comparison_table(comparisons: Sequence[Comparison]) -> str:
    """Markdown table of :func:`compare_learned`'s tests."""
    lines = [
        _row(["experiment", "test", "n learned", "n baseline", "U", "p", "min. possible p"]),
        _row(["---"] * 7),
    ]
    for item in comparisons:
        lines.append(
            _row(
                [
                    item.experiment,
                    f"learned < {_sharing_label(item.baseline)}",
                    str(item.learned_runs),
                    str(item.baseline_runs),
                    "—" if item.statistic is None else f"{item.statistic:g}",
                    "—" if item.p_value is None else f"{item.p_value:.4f}",
                    "—" if item.min_p_value is None else f"{item.min_p_value:.4f}",
                ]
            )
        )
    return "\n".join(lines)


def weight_table(runs: Sequence[Run]) -> str:
    """Weights that the task networks use, per experiment and sharing mode.

    Learned sharing's count depends on the assignment each run ends with, so the cell shows
    the mean and the range over runs. The last columns give the same net under full and under
    no sharing for reference.
    """
    lines = [
        _row(["experiment", "sharing", "weights used", "full sharing", "no sharing", "used / no"]),
        _row(["---"] * 6),
    ]
    cells = runs_by_cell(runs)
    for experiment in experiments(runs):
        for mode in sharing_modes(runs):
            cell = cells.get((experiment, mode))
            if not cell:
                continue
            used = [run.results["weights"]["assignment"] for run in cell]
            full = cell[0].results["weights"]["full_sharing"]
            none = cell[0].results["weights"]["no_sharing"]
            used_text = f"{np.mean(used):,.0f}"
            if min(used) != max(used):
                used_text += f" ({min(used):,}–{max(used):,})"
            ratio = f"{100 * np.mean(used) / none:.1f} %" if none else "—"
            lines.append(
                _row([experiment, _sharing_label(mode), used_text, f"{full:,}", f"{none:,}", ratio])
            )
    return "\n".join(lines)


def task_error_table(runs: Sequence[Run]) -> str:
    """Test error per task in percent: mean ± sample standard deviation over runs."""
    lines = [_row(["experiment", "sharing", "task", "test error (%)"]), _row(["---"] * 4)]
    cells = runs_by_cell(runs)
    for experiment in experiments(runs):
        for mode in sharing_modes(runs):
            cell = cells.get((experiment, mode))
            if not cell:
                continue
            for task in cell[0].tasks:
                values = [
                    float(run.results["test"]["error_per_task"][task])
                    for run in cell
                    if task in run.results["test"]["error_per_task"]
                ]
                lines.append(_row([experiment, _sharing_label(mode), task, _mean_std(values)]))
    return "\n".join(lines)


def run_table(runs: Sequence[Run]) -> str:
    """List the runs, one row each.

    The columns are the folder, experiment, sharing mode, seed, banks per layer, training
    steps and test error.
    """
    header = ["run", "experiment", "sharing", "seed", "banks per layer", "steps", "test error (%)"]
    lines = [_row(header), _row(["---"] * len(header))]
    for run in runs:
        seed = "—" if run.seed is None else str(run.seed)
        banks = _setting_text(run.results.get("banks_per_layer"))
        steps = _setting_text(run.results.get("steps"))
        error = f"{100 * run.error:.2f}"
        cells = [f"`{run.path}`", run.experiment, run.sharing, seed, banks, steps, error]
        lines.append(_row(cells))
    return "\n".join(lines)


def mixed_settings(runs: Sequence[Run]) -> list[str]:
    """Return one line per table cell and setting whose runs differ, and per repeated seed.

    The tables pool every run of an (experiment, sharing mode) cell, so the runs of a sweep
    over K, the NES learning rate or the step count would be averaged together. Each line
    names the setting (:data:`POOLED_SETTINGS` from results.json, then the config keys of
    ``Run.settings``), its values and how many runs have each. Runs with the same settings
    and the same seed are repeats, not independent samples, and get a line per seed.
    """
    lines = []
    for (experiment, mode), cell_runs in sorted(runs_by_cell(runs).items()):
        prefix = f"{experiment}, {_sharing_label(mode)}"
        columns = _pooled_values(cell_runs)
        for label, values in columns.items():
            counts: dict[str, int] = defaultdict(int)
            for value in values:
                counts[value] += 1
            if len(counts) > 1:
                lines.append(f"{prefix}: {label} differ: {_counts_text(counts)}")

        # Count the runs per seed and full set of settings.
        signatures: dict[tuple[int, tuple[str, ...]], int] = defaultdict(int)
        for index, run in enumerate(cell_runs):
            if run.seed is not None:
                signatures[(run.seed, tuple(values[index] for values in columns.values()))] += 1
        repeated: dict[int, int] = {}
        for (seed, _), count in signatures.items():
            if count > 1:
                repeated[seed] = max(repeated.get(seed, 0), count)
        for seed, count in sorted(repeated.items()):
            lines.append(
                f"{prefix}: seed {seed} is in {count} runs with the same settings, which "
                "repeat one run rather than add independent samples"
            )
    return lines


def _pooled_values(runs: Sequence[Run]) -> dict[str, list[str]]:
    """Return each setting's value per run, in run order, labelled as the report shows them."""
    values = {
        label: [_setting_text(run.results.get(key)) for run in runs]
        for key, label in POOLED_SETTINGS.items()
    }
    keys = sorted({key for run in runs for key in run.settings})
    for key in keys:
        values[key] = [run.settings.get(key, "unset") for run in runs]
    return values


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(
        f"{value} ({count} run{'' if count == 1 else 's'})" for value, count in counts.items()
    )


def _setting_text(value: object) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, list):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return str(value)


def skipped_list(skipped: Sequence[SkippedRun]) -> str:
    """Markdown list naming each left-out path and the reason."""
    return "\n".join(f"- `{item.path}`: {item.reason}" for item in skipped)


def _mean_std(values: Sequence[float]) -> str:
    """Format fractions as percent: ``mean ± sample std (n=N)``, or ``mean (n=1)``."""
    if not values:
        return "—"
    percent = 100 * np.asarray(values, dtype=float)
    if len(percent) == 1:
        return f"{percent[0]:.2f} (n=1)"
    return f"{percent.mean():.2f} ± {percent.std(ddof=1):.2f} (n={len(percent)})"


def _sharing_label(mode: str) -> str:
    return SHARING_LABELS.get(mode, mode)


def _row(cells: Sequence[str]) -> str:
    escaped = [str(cell).replace("|", "\\|") for cell in cells]
    return "| " + " | ".join(escaped) + " |"
