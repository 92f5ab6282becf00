"""Per-task test error with torchmetrics, and the two means the LWS experiments report."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy


class TaskErrors(nn.Module):
    """Accumulates classification error per task over one pass of the test loaders.

    Each task's accuracy metric is sized by that task's own class count. Two means come out:
    ``error``, the error over all test examples (tasks weighted by their test-set size, the
    number the LWS paper reports), and ``error_task_mean``, the plain mean over tasks.
    """

    def __init__(self, num_classes: Sequence[int]) -> None:
        super().__init__()
        self.accuracy = nn.ModuleList(
            MulticlassAccuracy(num_classes=int(c), average="micro") for c in num_classes
        )
        self.totals = MetricCollection({"wrong": SumMetric(), "seen": SumMetric()})

    def update(self, task: int, logits: Tensor, target: Tensor) -> None:
        self.accuracy[task].update(logits, target)
        wrong = (logits.argmax(-1) != target).sum().to(torch.float32)
        self.totals["wrong"].update(wrong)
        self.totals["seen"].update(torch.tensor(float(target.numel()), device=wrong.device))

    def compute(self) -> dict[str, Tensor]:
        """Return per-task errors (key ``task_<t>``), ``error`` and ``error_task_mean``."""
        per_task = torch.stack([1.0 - metric.compute() for metric in self.accuracy])
        totals = self.totals.compute()
        result = {f"task_{t}": err for t, err in enumerate(per_task)}
        result["error"] = totals["wrong"] / totals["seen"].clamp_min(1.0)
        result["error_task_mean"] = per_task.mean()
        return result

    def reset(self) -> None:
        for metric in self.accuracy:
            metric.reset()
        self.totals.reset()
