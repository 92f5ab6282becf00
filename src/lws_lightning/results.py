"""The files a finished run leaves in its output folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lws_lightning.lit.module import LWSModule
from lws_lightning.report.assignment import plot_assignment

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
ASSIGNMENT_FILE = "assignment.png"


def collect_results(module: LWSModule, test_metrics: dict[str, float]) -> dict[str, Any]:
    """Gather test errors, the most likely assignment, π and weight counts of a trained module."""
    assignment = module.most_likely_assignment().cpu()
    hparams = module.hparams
    return {
        "sharing": hparams.sharing,
        "architecture": hparams.architecture,
        # The configured K; full and none sharing override it per layer (1 and T banks).
        "num_banks": hparams.num_banks,
        "banks_per_layer": list(module.distribution.num_banks),
        "steps": int(module.global_step),
        "tasks": module.task_names,
        "test": {
            "error": test_metrics["test/error"],
            "error_task_mean": test_metrics["test/error_task_mean"],
            "error_per_task": {
                name: test_metrics[f"test/error/{name}"] for name in module.task_names
            },
        },
        "assignment": assignment.tolist(),
        "probs": [
            [row[:k] for row in layer]
            for layer, k in zip(
                module.distribution.probs.tolist(), module.distribution.num_banks, strict=True
            )
        ],
        "entropy": module.distribution.entropy().mean().item(),
        "weights": module.net.weight_counts(assignment),
        "history": module.history,
    }


def write_results(results: dict[str, Any], output_dir: str | Path) -> Path:
    """Write ``results.json`` and ``assignment.png`` into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2))
    plot_assignment(
        results["assignment"],
        results["tasks"],
        output_dir / ASSIGNMENT_FILE,
        title=f"{results['sharing']} sharing: most likely assignment\n(cell = bank)",
    )
    log.info("Wrote %s and %s", path, output_dir / ASSIGNMENT_FILE)
    return path
