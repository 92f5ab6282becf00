"""Wiring of one training run from a composed Hydra config; the algorithm lives elsewhere."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import DictConfig, ListConfig, OmegaConf

from lws_lightning.allocator import retain_freed_memory
from lws_lightning.config_checks import check_config
from lws_lightning.errors import UserInputError
from lws_lightning.export import read_lws_checkpoint
from lws_lightning.lit.loggers import WANDB_RUN_ID_KEY, finish_wandb_runs, resume_wandb_run
from lws_lightning.lit.module import LWSModule
from lws_lightning.results import collect_results, write_results

log = logging.getLogger(__name__)

# Lightning's names of the precisions LWS supports (trainer.precision=32 becomes "32-true").
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
_RESUME_HINT = "Resume with the model overrides of that run, or drop ckpt_path to start fresh."
# Model settings that a resumed run must share with its checkpoint: with another value, the
# results would be reported under settings that did not produce them.
RESUME_SETTINGS = (
    "architecture",
    "architecture_options",
    "sharing",
    "num_banks",
    "task_names",
    "assignment",
)


def _silence_known_warnings() -> None:
    # ModelCheckpoint warns under manual optimization that it saves the weights after the
    # optimizer step. That is the state a resumed run needs, since global_step counts
    # finished steps.
    warnings.filterwarnings(
        "ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning
    )


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Build every node of a group (loggers, callbacks) that has a ``_target_``."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node and "_target_" in node]


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule) -> LWSModule:
    """Build the LWS module for ``cfg.model`` on the tasks of ``datamodule``."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return LWSModule(
        num_classes=datamodule.num_classes,
        input_shape=datamodule.input_shape,
        task_names=datamodule.task_names,
        seed=int(cfg.seed),
        **model,
    )


def _setting(hparams: Any, key: str) -> Any:
    """Return hyperparameter ``key`` as plain lists and dicts, with missing options as {}."""
    value = _plain(hparams.get(key))
    return {} if key == "architecture_options" and value is None else value


def _plain(value: Any) -> Any:
    """Return ``value`` with OmegaConf containers and tuples as plain dicts and lists."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class ResumedCheckpoint:
    """The checkpoint state a run resumed with ``ckpt_path`` needs besides the weights."""

    step: int
    wandb_run_id: str | None


def _check_checkpoint_path(path: str | None, module: LWSModule) -> ResumedCheckpoint | None:
    """Raise :class:`UserInputError` unless ``ckpt_path`` is unset or fits ``module``.

    Returns:
        The checkpoint's iteration count and W&B run id, or None without ``ckpt_path``.

    The checkpoint must be a readable LWS checkpoint with ``module``'s settings in
    :data:`RESUME_SETTINGS` and weights of the same names and shapes. A checkpoint of learned
    sharing resumed as no sharing, for example, has the same shapes for 3 tasks and K = 3, but
    would keep its learned assignment under the new mode's name.
    """
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserInputError(
            f"ckpt_path={path} is not a file. Give the path of a last.ckpt written by an "
            "earlier run, or drop ckpt_path to start fresh."
        )
    try:
        checkpoint = read_lws_checkpoint(path)
    except UserInputError as error:
        raise UserInputError(f"ckpt_path={path} is invalid: {error}") from None
    differing = []
    for key in RESUME_SETTINGS:
        saved_value = _setting(checkpoint["hyper_parameters"], key)
        value = _setting(module.hparams, key)
        if saved_value != value:
            label = "task names" if key == "task_names" else f"model.{key}"
            differing.append(f"{label} {saved_value} in the checkpoint, {value} here")
    if differing:
        raise UserInputError(
            f"ckpt_path={path} was written by a run with other model settings: "
            f"{'; '.join(differing)}. {_RESUME_HINT}"
        )
    saved = checkpoint["state_dict"]
    current = module.state_dict()
    mismatched = sorted(set(saved) ^ set(current))
    mismatched += [
        key for key in sorted(set(saved) & set(current)) if saved[key].shape != current[key].shape
    ]
    if mismatched:
        raise UserInputError(
            f"ckpt_path={path} was written by a run with other model settings: its weights "
            f"differ from this run's in {len(mismatched)} entries, first {mismatched[0]}. "
            f"{_RESUME_HINT}"
        )
    run_id = checkpoint.get(WANDB_RUN_ID_KEY)
    return ResumedCheckpoint(
        step=int(checkpoint.get("global_step", 0)),
        wandb_run_id=run_id if isinstance(run_id, str) else None,
    )


def _log_training_range(cfg: DictConfig, resumed: ResumedCheckpoint | None, num_tasks: int) -> None:
    """Log the iterations this run trains, or warn that a resumed checkpoint trains no further."""
    start_step = resumed.step if resumed is not None else 0
    max_steps = int(cfg.trainer.max_steps)
    if resumed is not None and 0 <= max_steps <= start_step:
        log.warning(
            "ckpt_path=%s finished %d iterations, and trainer.max_steps=%d is not above that, "
            "so this run trains no further and only tests the checkpoint. Set "
            "trainer.max_steps above %d to train on.",
            cfg.ckpt_path,
            start_step,
            max_steps,
            start_step,
        )
    elif max_steps < 0 or start_step < max_steps:
        log.info(
            "Training %s with %s sharing on %d tasks from iteration %d to %s",
            cfg.model.architecture,
            cfg.model.sharing,
            num_tasks,
            start_step,
            max_steps if max_steps >= 0 else "the trainer's epoch limit",
        )


def _continue_wandb_run(cfg: DictConfig, run_id: str) -> None:
    """Point a single resumed run at its checkpoint's W&B run. Sweep jobs start their own."""
    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if in_sweep:
        log.info(
            "The checkpoint belongs to W&B run %s, and this sweep job starts a run of its own. "
            "Set logger.wandb.id to continue that run instead.",
            run_id,
        )
    elif resume_wandb_run(cfg.get("logger"), run_id):
        log.info("Continuing W&B run %s of the checkpoint", run_id)


def _check_trainer(trainer: L.Trainer) -> None:
    """Raise :class:`UserInputError` for a precision or strategy that LWS does not support."""
    if trainer.precision not in SUPPORTED_PRECISIONS:
        raise UserInputError(
            f"trainer.precision={trainer.precision} is not supported: the *-true precisions "
            "cast every buffer, π included, to that type. Use 32, bf16-mixed or 16-mixed."
        )
    strategy = trainer.strategy
    if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
        raise UserInputError(
            f"trainer.strategy={type(strategy).__name__} is not supported. Use a single device "
            "(trainer=cpu or trainer=gpu) or DDP (trainer=ddp)."
        )
    # NOTE: DDPStrategy exposes its start method only as the private `_start_method`.
    start_method = getattr(strategy, "_start_method", "popen")
    if start_method != "popen":
        raise UserInputError(
            f"DDP with start_method={start_method!r} (ddp_spawn, ddp_fork, ddp_notebook) is not "
            "supported: the processes it starts return only the weights to this process, so "
            "results.json would lose the iteration count and the evaluation history. Use "
            "trainer=ddp, which starts the processes by running the command again."
        )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test LWS as ``cfg`` specifies, then write results into ``cfg.paths.output_dir``.

    Returns:
        The results that ``results.json`` holds.
    """
    check_config(cfg)
    _silence_known_warnings()
    if cfg.get("retain_freed_memory", False):
        retain_freed_memory()
    L.seed_everything(int(cfg.seed), workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    try:
        module = build_module(cfg, datamodule)
    except (ValueError, TypeError) as error:
        raise UserInputError(f"The model config is invalid: {error}") from None
    resumed = _check_checkpoint_path(cfg.get("ckpt_path"), module)
    if resumed is not None and resumed.wandb_run_id:
        _continue_wandb_run(cfg, resumed.wandb_run_id)
    loggers = _instantiate_group(cfg.get("logger"))
    callbacks = _instantiate_group(cfg.get("callbacks"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    _check_trainer(trainer)

    succeeded = False
    try:
        _log_training_range(cfg, resumed, len(datamodule.num_classes))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        results = collect_results(module, test_metrics)
        if trainer.is_global_zero:
            write_results(results, output_dir)
            log.info(
                "Test error %.4f (mean over tasks %.4f); weights %s",
                results["test"]["error"],
                results["test"]["error_task_mean"],
                results["weights"],
            )
        succeeded = True
        return results
    finally:
        for logger in loggers:
            finalize = getattr(logger, "finalize", None)
            if finalize is not None:
                finalize("success" if succeeded else "failed")
        finish_wandb_runs(loggers, succeeded)
