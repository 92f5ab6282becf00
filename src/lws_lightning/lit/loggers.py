"""W&B runs for Hydra jobs: one run per job, named after its overrides, finished with the job.

Lightning's ``WandbLogger`` reuses any W&B run still open in the process and never finishes a
run itself. Hydra's default launcher runs all jobs of a multirun in one process, so without
:func:`finish_wandb_runs` every job after the first would log into the first job's run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from fnmatch import fnmatch
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

# Checkpoint key of the W&B run id, so that a resumed run logs into the same W&B run.
WANDB_RUN_ID_KEY = "wandb_run_id"
# Targets of logger config nodes that build a WandbLogger.
_WANDB_TARGETS = (
    "lws_lightning.lit.loggers.build_wandb_logger",
    "lightning.pytorch.loggers.WandbLogger",
    "lightning.pytorch.loggers.wandb.WandbLogger",
)

# Override keys left out of run names: the seed, so that the seeds of one setting share a name,
# the experiment name, which is the run's group, and keys that only set where files go or how
# they are logged.
DEFAULT_NAME_EXCLUDE = (
    "seed",
    "experiment_name",
    "paths.*",
    "hydra.*",
    "logger",
    "logger.*",
    "ckpt_path",
)


def run_name(
    overrides: Iterable[str],
    exclude: Sequence[str] = DEFAULT_NAME_EXCLUDE,
    default: str = "default",
) -> str:
    """Join a job's overrides into a run name, such as ``model.sharing=learned,model.lr=0.01``.

    Overrides whose key matches a pattern in ``exclude`` (``fnmatch`` syntax) are left out,
    and the rest are sorted, so the name does not depend on the order on the command line.
    ``default`` names a job whose overrides are all excluded.
    """
    name_parts = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not any(fnmatch(key, pattern) for pattern in exclude):
            name_parts.append(override)
    return ",".join(sorted(name_parts)) or default


def build_wandb_logger(
    overrides: Sequence[str] = (),
    name: str | None = None,
    name_exclude: Sequence[str] = DEFAULT_NAME_EXCLUDE,
    **kwargs: Any,
) -> WandbLogger:
    """Create the ``WandbLogger`` of one Hydra job.

    Args:
        overrides: The job's overrides (``hydra.overrides.task``), used by :func:`run_name`
            when ``name`` is None.
        name: Run name; None builds it from ``overrides``.
        name_exclude: Override-key patterns that :func:`run_name` leaves out.
        **kwargs: Passed on to ``WandbLogger`` and from there to ``wandb.init`` (project,
            entity, group, job_type, tags, save_dir, ...).
    """
    import wandb

    if wandb.run is not None:
        log.warning(
            "W&B run %s of an earlier job is still open; finishing it so that this job gets a "
            "run of its own.",
            wandb.run.id,
        )
        wandb.run.finish()
    return WandbLogger(name=name or run_name(overrides, name_exclude), **kwargs)


def finish_wandb_runs(loggers: Iterable[Logger], succeeded: bool) -> None:
    """Finish the open W&B run when ``loggers`` contains a ``WandbLogger``.

    The run gets exit code 0 if ``succeeded`` and 1 otherwise, which W&B shows as failed.
    Call this once per job, after each logger's ``finalize``, because ``finalize`` uploads
    checkpoints into the run.
    """
    if not any(isinstance(logger, WandbLogger) for logger in loggers):
        return
    import wandb

    if wandb.run is None:
        return
    exit_code = 0 if succeeded else 1
    log.info("Finishing W&B run %s with exit code %d", wandb.run.id, exit_code)
    wandb.run.finish(exit_code=exit_code)


def wandb_run_id(loggers: Iterable[Logger]) -> str | None:
    """Return the run id of the first ``WandbLogger`` in ``loggers``, or None.

    Reads the id without starting a W&B run when none has started yet.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            return logger.version
    return None


def resume_wandb_run(logger_config: DictConfig | None, run_id: str) -> bool:
    """Set ``id`` to ``run_id`` in each W&B node of ``logger_config`` that sets no id itself.

    ``WandbLogger`` starts its run with ``resume="allow"``, so the run continues the W&B run
    with that id. A node with ``id`` or ``version`` (WandbLogger's other name for the id) set
    keeps it. Returns whether a node was changed.
    """
    changed = False
    for node in (logger_config or {}).values():
        is_wandb = isinstance(node, DictConfig) and node.get("_target_") in _WANDB_TARGETS
        if is_wandb and node.get("id") is None and node.get("version") is None:
            with open_dict(node):
                node.id = run_id
            changed = True
    return changed
