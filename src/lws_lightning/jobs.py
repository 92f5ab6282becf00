"""One Hydra job around :func:`lws_lightning.run.train`: status file, sweep failures, DDP.

Every job writes ``status.json`` into its output folder. Inside a sweep (``-m``) a failed job
logs its traceback and returns, so the launcher goes on with the other jobs, and
:class:`SweepSummary` lists the failed jobs when the sweep ends. A single run still exits with
a non-zero code.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict, read_write

from lws_lightning import sigterm
from lws_lightning.errors import UserInputError

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
# Exit code of a single run whose config or data is invalid; other failures exit with 1.
USER_ERROR_EXIT_CODE = 2
# Exit code of a run stopped by SIGTERM, as a shell reports a process that the signal killed.
# Lightning stops on SIGTERM with an exception that would otherwise exit with code 0.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
# Hydra command-line flags that choose the config and take a value; they are passed on to the
# DDP processes of a sweep job.
_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
# Environment variables that Lightning's DDP launcher sets in the launching process.
_DDP_ENVIRONMENT = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_job(cfg: DictConfig, train: Callable[[DictConfig], dict[str, Any]]) -> float | None:
    """Run ``train(cfg)`` as one Hydra job and record the outcome in ``status.json``.

    Returns:
        The test error, or None when the job failed inside a sweep.

    Raises:
        SystemExit: A single run failed on invalid input (exit code 2), or a run or sweep
            stopped on SIGTERM (exit code 143).
        Exception: A single run failed otherwise; the error propagates unchanged.
    """
    hydra_config = HydraConfig.get()
    in_sweep = hydra_config.mode == RunMode.MULTIRUN
    resolve_data_root(cfg, hydra_config.runtime.cwd)
    if in_sweep:
        relaunch_ddp_as_single_run(hydra_config)

    started = time.time()
    try:
        with sigterm_raises():
            if in_sweep:
                with ddp_state_restored():
                    results = train(cfg)
            else:
                results = train(cfg)
    except BaseException as error:
        if isinstance(error, SIGTERMException):
            sigterm.clear()
            message = _sigterm_message(cfg, started)
            write_status(hydra_config, "failed", started, error, message)
            log.error("%s", message)
            sys.exit(SIGTERM_EXIT_CODE)
        write_status(hydra_config, "failed", started, error)
        if isinstance(error, UserInputError):
            log.error("%s", error)
            if in_sweep:
                return None
            sys.exit(USER_ERROR_EXIT_CODE)
        if in_sweep and isinstance(error, Exception):
            log.exception(
                "Job %s failed, and the sweep goes on with the other jobs. Overrides: %s",
                hydra_config.job.num,
                " ".join(hydra_config.overrides.task),
            )
            return None
        raise
    write_status(hydra_config, "ok", started)
    if sigterm.received():
        # Lightning records a SIGTERM during its last training or test batch, or after it,
        # without raising, so the run finished.
        sigterm.clear()
        log.error("The run received SIGTERM as it finished, and its results are complete.")
        sys.exit(SIGTERM_EXIT_CODE)
    return results["test"]["error"]


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Raise ``SIGTERMException`` on SIGTERM where Lightning's own handler is not installed.

    Lightning handles SIGTERM only while the trainer runs, and stops after the current step.
    Before that, while the data is prepared and the model built, the signal would end the
    process without a status file. While the trainer runs, Lightning calls this handler after
    its own, and the handler leaves the stop to Lightning. Every SIGTERM is recorded in
    :mod:`lws_lightning.sigterm`, and one recorded before the context raises on entry.
    Signal handlers can be set only in the main thread, so elsewhere the context does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        sigterm.mark_received()
        if signal.getsignal(signal.SIGTERM) is handler:
            raise SIGTERMException()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        if sigterm.received():
            raise SIGTERMException()
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolve_data_root(cfg: DictConfig, original_cwd: str) -> None:
    """Make a relative ``data.root`` absolute against the folder the command ran in.

    Every job of a sweep then reads, and downloads into, the same folder, whatever its own
    working directory is (``hydra.job.chdir=true`` puts it in the job's output folder).
    """
    data = cfg.get("data")
    if data is None or data.get("root") is None:
        return
    root = Path(str(data.root)).expanduser()
    if root.is_absolute():
        return
    with open_dict(data):
        data.root = str(Path(original_cwd) / root)


def relaunch_ddp_as_single_run(hydra_config: DictConfig) -> None:
    """Make Lightning start the other DDP processes of this sweep job as a single run.

    Lightning (2.6) starts ranks 1 and up by running ``sys.argv`` again with
    ``hydra.run.dir`` set to the job's ``hydra.run.dir``. In a sweep, ``sys.argv`` contains
    ``-m`` and the whole sweep, so every such process would start the sweep anew. This keeps
    only the config flags and this job's overrides in ``sys.argv`` and points
    ``hydra.run.dir`` at the job's output folder.
    """
    argv = [sys.argv[0], *_config_flags(sys.argv[1:]), *hydra_config.overrides.task]
    sys.argv = argv
    with read_write(hydra_config), open_dict(hydra_config):
        hydra_config.run.dir = hydra_config.runtime.output_dir


@contextmanager
def ddp_state_restored() -> Iterator[None]:
    """Let the next job in this process start DDP afresh.

    Lightning's DDP launcher sets LOCAL_RANK, WORLD_SIZE, NODE_RANK, MASTER_ADDR and MASTER_PORT
    in this process's environment and leaves the process group open. A later sweep job in the
    same process would take that environment for one set up by a cluster, start no processes
    and reuse a group whose other processes have exited. This closes the group and puts the
    variables back as they were.
    """
    saved = {key: os.environ.get(key) for key in _DDP_ENVIRONMENT}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _config_flags(arguments: list[str]) -> list[str]:
    forwarded: list[str] = []
    take_next = False
    for argument in arguments:
        if take_next:
            forwarded.append(argument)
            take_next = False
        elif argument in _CONFIG_FLAGS:
            forwarded.append(argument)
            take_next = True
        elif argument.split("=", 1)[0] in _CONFIG_FLAGS and argument.startswith("--"):
            forwarded.append(argument)
    return forwarded


def write_status(
    hydra_config: DictConfig,
    status: str,
    started: float,
    error: BaseException | None = None,
    message: str | None = None,
) -> Path | None:
    """Write ``status.json`` into the job's output folder; only global rank 0 writes.

    The error entry is the exception's type and ``message``, by default the exception's text.

    Returns:
        The path written, or None on other ranks.
    """
    if rank_zero_only.rank != 0:
        return None
    output_dir = Path(hydra_config.runtime.output_dir)
    record: dict[str, Any] = {
        "status": status,
        "overrides": list(hydra_config.overrides.task),
        "job": {
            "num": hydra_config.job.get("num"),
            "id": hydra_config.job.get("id"),
            "name": hydra_config.job.name,
        },
        "output_dir": str(output_dir),
        "started": _timestamp(started),
        "finished": _timestamp(time.time()),
        "duration_s": round(time.time() - started, 3),
    }
    if error is not None:
        record["error"] = f"{type(error).__name__}: {message or error}"
        record["traceback"] = "".join(traceback.format_exception(error))
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / STATUS_FILE
    path.write_text(json.dumps(record, indent=2))
    return path


def _sigterm_message(cfg: DictConfig, started: float) -> str:
    """Describe a stop on SIGTERM and name the checkpoint to resume from, if there is one.

    Only a ``last.ckpt`` written since ``started`` counts, so that a file left by an earlier
    run in the same folder is not named. Without one, a resumed run points back to its
    ``ckpt_path``.
    """
    checkpoint = _new_checkpoint(cfg, started)
    if checkpoint is not None:
        resume = f"Resume it with ckpt_path={checkpoint} and the same overrides."
    elif cfg.get("ckpt_path"):
        resume = (
            "It wrote no checkpoint of its own, so resume it from the one it started from: "
            f"ckpt_path={cfg.ckpt_path}."
        )
    else:
        resume = "It wrote no last.ckpt to resume from, so start it again."
    return f"The run stopped on SIGTERM. {resume}"


def _new_checkpoint(cfg: DictConfig, started: float) -> Path | None:
    """Return the newest ``last.ckpt`` written since ``started``, or None.

    It looks in the checkpoint callback's dirpath and anywhere under the output folder, where
    Lightning puts the file when dirpath is null (under the logger's folder).
    """
    candidates = list(Path(cfg.paths.output_dir).rglob("last.ckpt"))
    for node in (cfg.get("callbacks") or {}).values():
        target = node.get("_target_", "") if isinstance(node, DictConfig) else ""
        if str(target).endswith("Checkpoint") and node.get("dirpath"):
            candidates.append(Path(node.dirpath) / "last.ckpt")
    written = [path for path in candidates if path.is_file() and path.stat().st_mtime >= started]
    return max(written, key=lambda path: path.stat().st_mtime, default=None)


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")


class SweepCallback(Callback):
    """Hydra callback for sweeps: makes ``${hydra:...}`` resolvable and lists failed jobs.

    At the start it registers the sweep's config as the current Hydra config. Hydra (1.3) does
    that only when a job starts, so ``hydra.sweep.dir``, which reaches ``${hydra:runtime.cwd}``
    through ``paths.root_dir`` and ``${hydra:runtime.choices.experiment}`` through
    ``experiment_name``, could not be resolved in the launching process.

    At the end it reads every ``status.json`` under ``hydra.sweep.dir`` and logs the failed
    jobs. If there are any, it exits with code 1 so that scripts notice. The other jobs have
    finished by then. A job whose process died (killed for memory, a SLURM time limit) writes
    no status file, and the launcher then aborts the sweep itself with an error.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A copy, because set_config marks the hydra node of the config it gets read-only.
        HydraConfig.instance().set_config(copy.deepcopy(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        records = [json.loads(path.read_text()) for path in sorted(sweep_dir.rglob(STATUS_FILE))]
        failed = [record for record in records if record.get("status") != "ok"]
        for record in failed:
            log.error(
                "Job %s failed with %s\n  overrides: %s\n  output folder: %s",
                record["job"]["num"],
                record.get("error", "no recorded error"),
                " ".join(record["overrides"]),
                record["output_dir"],
            )
        log.info(
            "Sweep finished: %d jobs ok, %d failed, in %s",
            len(records) - len(failed),
            len(failed),
            sweep_dir,
        )
        if failed:
            sys.exit(1)
