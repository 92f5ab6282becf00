"""A run stopped by SIGTERM exits with code 143, records the failure and names a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lws_lightning import sigterm
from lws_lightning.jobs import SIGTERM_EXIT_CODE, STATUS_FILE, _sigterm_message, run_job


def wait_for_iterations(run_dir: Path, process: subprocess.Popen, timeout: float) -> None:
    """Wait until the run has logged a few iterations and written a checkpoint."""
    metrics = run_dir / "csv" / "metrics.csv"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"The run ended early with code {process.returncode}.")
        logged = metrics.exists() and len(metrics.read_text().splitlines()) > 3
        if logged and (run_dir / "last.ckpt").exists():
            return
        time.sleep(0.5)
    raise AssertionError(f"No metrics in {metrics} after {timeout} s.")


def test_sigterm_exits_143(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (tmp_path / "data").mkdir()
    command = [sys.executable, "-m", "lws_lightning", "trainer.max_steps=100000"]
    command += ["trainer.log_every_n_steps=1", "trainer.val_check_interval=4"]
    command += [f"hydra.run.dir={run_dir}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "output.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=environment, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            wait_for_iterations(run_dir, process, timeout=120)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        finally:
            process.kill()

    assert process.returncode == SIGTERM_EXIT_CODE
    resume_hint = f"Resume it with ckpt_path={run_dir / 'last.ckpt'} and the same overrides."
    assert f"The run stopped on SIGTERM. {resume_hint}" in log_path.read_text()
    status = json.loads((run_dir / STATUS_FILE).read_text())
    assert status["status"] == "failed"
    assert status["error"] == f"SIGTERMException: The run stopped on SIGTERM. {resume_hint}"
    # The checkpoint of the last evaluation before the signal is there to resume from.
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] % 4 == 0
    assert checkpoint["lws_history"][-1]["step"] == checkpoint["global_step"]


def test_sigterm_message_names_checkpoint(compose_config, tmp_path: Path) -> None:
    """The message names a last.ckpt written since the start, else the run's ckpt_path."""
    started = time.time()
    cfg = compose_config()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True)
    no_checkpoint = "It wrote no last.ckpt to resume from, so start it again."
    assert _sigterm_message(cfg, started).endswith(no_checkpoint)

    stale = output_dir / "last.ckpt"
    stale.write_bytes(b"written by an earlier run")
    os.utime(stale, (started - 60, started - 60))
    assert _sigterm_message(cfg, started).endswith(no_checkpoint)
    resumed = compose_config(f"ckpt_path={tmp_path / 'earlier.ckpt'}")
    assert _sigterm_message(resumed, started).endswith(
        "It wrote no checkpoint of its own, so resume it from the one it started from: "
        f"ckpt_path={tmp_path / 'earlier.ckpt'}."
    )

    stale.touch()
    expected = f"Resume it with ckpt_path={stale} and the same overrides."
    assert _sigterm_message(cfg, started).endswith(expected)


def test_sigterm_message_reads_checkpoint_dirpath(compose_config, tmp_path: Path) -> None:
    started = time.time()
    checkpoints = tmp_path / "checkpoints"
    cfg = compose_config(f"callbacks.model_checkpoint.dirpath={checkpoints}")
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"fresh")
    expected = f"Resume it with ckpt_path={checkpoints / 'last.ckpt'} and the same overrides."
    assert _sigterm_message(cfg, started).endswith(expected)

    # With dirpath null, Lightning writes under the logger's folder in the output folder.
    cfg = compose_config("callbacks.model_checkpoint.dirpath=null")
    logger_checkpoints = Path(cfg.paths.output_dir) / "csv" / "checkpoints"
    logger_checkpoints.mkdir(parents=True)
    (logger_checkpoints / "last.ckpt").write_bytes(b"fresh")
    expected = f"Resume it with ckpt_path={logger_checkpoints / 'last.ckpt'} and the same"
    assert expected in _sigterm_message(cfg, started)


def test_sigterm_before_training_writes_status(compose_config) -> None:
    """SIGTERM before Lightning installs its handler still records the stop and exits 143."""
    cfg = compose_config()

    def stopped_during_setup(_: object) -> dict:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the run")

    # Without run_job's handler, this one keeps the signal from ending pytest.
    ignore = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        guard = signal.getsignal(signal.SIGTERM)
        with pytest.raises(SystemExit) as stopped:
            run_job(cfg, stopped_during_setup)
        assert signal.getsignal(signal.SIGTERM) is guard
    finally:
        signal.signal(signal.SIGTERM, ignore)

    assert stopped.value.code == SIGTERM_EXIT_CODE
    status = json.loads((Path(cfg.paths.output_dir) / STATUS_FILE).read_text())
    assert status["error"] == (
        "SIGTERMException: The run stopped on SIGTERM. It wrote no last.ckpt to resume from, "
        "so start it again."
    )


def test_sigterm_before_run_job_stops_job(compose_config) -> None:
    """A SIGTERM recorded during the command's imports stops the job when run_job starts."""
    cfg = compose_config()

    def never_called(_: object) -> dict:
        raise AssertionError("the job ran despite the recorded SIGTERM")

    sigterm.mark_received()
    with pytest.raises(SystemExit) as stopped:
        run_job(cfg, never_called)

    assert stopped.value.code == SIGTERM_EXIT_CODE
    assert not sigterm.received()
    status = json.loads((Path(cfg.paths.output_dir) / STATUS_FILE).read_text())
    assert status["status"] == "failed"
    assert status["error"].startswith("SIGTERMException: The run stopped on SIGTERM.")


def test_sigterm_as_run_finishes_exits_143(compose_config) -> None:
    """A SIGTERM that Lightning lets pass near the end still ends the job with code 143."""
    cfg = compose_config()

    def finishes_despite_signal(_: object) -> dict:
        # As Lightning does while the trainer runs: its handler calls the one before it and
        # only records the signal.
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: previous(signum, frame))
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return {"test": {"error": 0.25}}

    ignore = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with pytest.raises(SystemExit) as stopped:
            run_job(cfg, finishes_despite_signal)
    finally:
        signal.signal(signal.SIGTERM, ignore)

    assert stopped.value.code == SIGTERM_EXIT_CODE
    assert not sigterm.received()
    status = json.loads((Path(cfg.paths.output_dir) / STATUS_FILE).read_text())
    assert status["status"] == "ok"
