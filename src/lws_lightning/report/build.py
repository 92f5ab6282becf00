"""Assemble ``report.md`` and its figures from run and multirun folders."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lws_lightning.report.figures import (
    error_curves,
    group_size_shares,
    plot_error_curves,
    plot_group_sizes,
)
from lws_lightning.report.runs import Run, SkippedRun, collect_runs
from lws_lightning.report.tables import (
    compare_learned,
    comparison_table,
    error_table,
    experiments,
    mixed_settings,
    run_table,
    skipped_list,
    task_error_table,
    weight_table,
)

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"


@dataclass
class Report:
    """Files that :func:`write_report` wrote, and the runs it read or left out."""

    markdown: Path
    figures: list[Path] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    skipped: list[SkippedRun] = field(default_factory=list)


def write_report(paths: Iterable[str | Path], output_dir: str | Path) -> Report:
    """Write ``report.md`` and PNG figures into ``output_dir`` for the runs under ``paths``.

    Runs that are missing or incomplete are listed in the report and left out of every table
    and figure. The report is written even when no run is complete.
    """
    paths = [Path(p) for p in paths]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runs, skipped = collect_runs(paths)
    report = Report(markdown=output_dir / REPORT_FILE, runs=runs, skipped=skipped)

    sections = [_header(paths, runs, skipped)]
    mixed = mixed_settings(runs)
    if mixed:
        for line in mixed:
            log.warning("The report pools runs that may not belong together: %s", line)
        sections.append(
            "## Mixed settings\n\nSome cells of the tables below average runs whose settings "
            "differ, or count one seed's run several times. Pass the runs of each setting (for "
            "example each K of a sweep) to separate reports to compare them, and leave out "
            "repeated runs, which make the standard deviations and p-values look more certain "
            "than they are.\n\n" + "\n".join(f"- {line}" for line in mixed)
        )
    if runs:
        sections.append(_error_section(runs))
        sections.append(_group_size_section(runs, output_dir, report.figures))
        sections.append(_curve_section(runs, output_dir, report.figures))
        sections.append(
            "## Weight counts\n\nWeights of all task networks together, each module counted "
            "once however many tasks use it.\n\n" + weight_table(runs)
        )
        sections.append("## Test error per task (%)\n\n" + task_error_table(runs))
        sections.append("## Runs\n\n" + run_table(runs))
    if skipped:
        sections.append("## Left out\n\n" + skipped_list(skipped))

    report.markdown.write_text("\n\n".join(sections) + "\n")
    log.info("Wrote %s", report.markdown)
    for figure in report.figures:
        log.info("Wrote %s", figure)
    return report


def _header(paths: Sequence[Path], runs: Sequence[Run], skipped: Sequence[SkippedRun]) -> str:
    sources = ", ".join(f"`{path}`" for path in paths)
    text = (
        f"# LWS report\n\nRead from {sources}: {len(runs)} complete runs, {len(skipped)} left out."
    )
    if skipped:
        text += " The left-out paths and the reasons are listed at the end."
    if not runs:
        text += "\n\nNo complete run was found, so there are no tables or figures."
    return text


def _error_section(runs: Sequence[Run]) -> str:
    return "\n\n".join(
        [
            "## Test error (%)",
            "Example-weighted test error (all test examples of all tasks pooled) at the end of "
            "training: mean ± sample standard deviation over runs, n runs per cell. The lowest "
            "mean of each experiment is bold.",
            error_table(runs),
            "### Learned sharing against the baselines",
            'One-sided Mann–Whitney U tests (scipy.stats.mannwhitneyu, alternative="less") of '
            "whether learned sharing's test errors are lower than the baseline's. With few "
            "runs per side the exact test cannot go below the last column's value.",
            comparison_table(compare_learned(runs)),
        ]
    )


def _group_size_section(runs: Sequence[Run], output_dir: Path, figures: list[Path]) -> str:
    parts = [
        "## Sharing-group sizes (learned sharing)",
        "For each shareable layer, the share of tasks whose bank in the most likely assignment "
        "is used by exactly t tasks, over all learned-sharing runs of the experiment.",
    ]
    for experiment in experiments(runs):
        learned = [run for run in runs if run.experiment == experiment and run.sharing == "learned"]
        if not learned:
            parts.append(f"### {experiment}\n\nNo learned-sharing runs.")
            continue
        shape = np.shape(learned[0].results["assignment"])
        same_shape = [run for run in learned if np.shape(run.results["assignment"]) == shape]
        note = ""
        if len(same_shape) < len(learned):
            note = (
                f"\n\n{len(learned) - len(same_shape)} runs with an assignment shape other "
                f"than {shape} are left out of this figure."
            )
        shares = group_size_shares([run.results["assignment"] for run in same_shape])
        path = plot_group_sizes(
            shares,
            output_dir / f"group_sizes_{_file_stem(experiment)}.png",
            title=f"{experiment}: sharing-group sizes over {len(same_shape)} runs",
        )
        figures.append(path)
        parts.append(
            f"### {experiment}\n\n![sharing-group sizes of {experiment}]({path.name}){note}\n\n"
            + _shares_table(shares)
        )
    return "\n\n".join(parts)


def _shares_table(shares: np.ndarray) -> str:
    num_layers, num_tasks = shares.shape
    header = "| layer | " + " | ".join(f"t={size}" for size in range(1, num_tasks + 1)) + " |"
    rule = "|" + " --- |" * (num_tasks + 1)
    rows = [
        f"| L{layer} | " + " | ".join(f"{value:.2f}" for value in shares[layer]) + " |"
        for layer in range(num_layers)
    ]
    return "\n".join([header, rule, *rows])


def _curve_section(runs: Sequence[Run], output_dir: Path, figures: list[Path]) -> str:
    parts = [
        "## Test error over iterations",
        "Example-weighted test error at each evaluation: mean over runs, with a band of ±1 "
        "sample standard deviation where a mode has several runs.",
    ]
    for experiment in experiments(runs):
        curves = error_curves([run for run in runs if run.experiment == experiment])
        path = plot_error_curves(
            curves,
            output_dir / f"error_curves_{_file_stem(experiment)}.png",
            title=f"{experiment}: test error over iterations",
        )
        figures.append(path)
        parts.append(f"### {experiment}\n\n![test error of {experiment}]({path.name})")
    return "\n\n".join(parts)


def _file_stem(name: str) -> str:
    """Turn an experiment name such as ``paper/mnist`` into a safe file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "experiment"
