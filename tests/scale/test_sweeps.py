"""Hydra sweeps of the command-line app: one folder per job, failures isolated, status files."""

from __future__ import annotations

import itertools
import json
import logging
import sys

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from lws_lightning.jobs import (
    STATUS_FILE,
    SweepCallback,
    _config_flags,
    relaunch_ddp_as_single_run,
    resolve_data_root,
)

from .conftest import TINY, app_env, run_app

FAST = (*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2")


def _sweep_jobs(root):
    """Return the job folders of the only sweep under ``root/outputs``, by job number."""
    (sweep_dir,) = (root / "outputs" / "mnist_trio_convnet" / "multiruns").iterdir()
    jobs = sorted((path for path in sweep_dir.iterdir() if path.is_dir()), key=lambda p: p.name)
    return sweep_dir, jobs


def _overrides(job_dir) -> dict[str, str]:
    lines = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    return dict(line.split("=", 1) for line in lines)


def test_multirun_2x2_one_folder_per_job(tmp_path, data_root):
    result = run_app(
        "-m", *FAST, f"data.root={data_root}", "model.num_banks=2,3", "seed=0,1", cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    sweep_dir, jobs = _sweep_jobs(tmp_path)
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    combinations = set()
    for job in jobs:
        overrides = _overrides(job)
        combinations.add((overrides["model.num_banks"], overrides["seed"]))
        results = json.loads((job / "results.json").read_text())
        assert results["num_banks"] == int(overrides["model.num_banks"]), job
        assert len(results["probs"][0][0]) == int(overrides["model.num_banks"]), job
        status = json.loads((job / STATUS_FILE).read_text())
        assert status["status"] == "ok", job
        assert f"seed={overrides['seed']}" in status["overrides"]
    assert combinations == set(itertools.product(("2", "3"), ("0", "1")))
    assert "Sweep finished: 4 jobs ok, 0 failed" in output
    # The jobs read the shared data root and never install data into their own folders.
    assert (data_root / "FashionMNIST").is_dir()
    assert not list(sweep_dir.rglob("FashionMNIST"))


def test_multirun_failed_job_isolated(tmp_path, data_root):
    # Job 0 fails while building the module; job 1 must still train and write its results.
    result = run_app(
        "-m", *FAST, f"data.root={data_root}", "model.engine=no_such_engine,literal", cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-6000:]

    _, (failed, finished) = _sweep_jobs(tmp_path)
    status = json.loads((failed / STATUS_FILE).read_text())
    assert status["status"] == "failed"
    assert status["error"].startswith("UserInputError: The model config is invalid")
    assert "model.engine='no_such_engine' is unknown" in status["error"]
    assert "Traceback" in status["traceback"]
    assert "model.engine=no_such_engine" in status["overrides"]
    assert not (failed / "results.json").exists()
    # Invalid input is logged as one paragraph; status.json keeps the traceback.
    assert "no_such_engine" in (failed / "__main__.log").read_text()

    assert json.loads((finished / STATUS_FILE).read_text())["status"] == "ok"
    assert (finished / "results.json").is_file()
    assert "Job 0 failed with UserInputError" in output
    assert "Sweep finished: 1 jobs ok, 1 failed" in output


def test_single_run_failure_exits_nonzero(tmp_path, data_root):
    result = run_app(*FAST, f"data.root={data_root}", "model.engine=no_such_engine", cwd=tmp_path)
    # Invalid input exits with 2; other failures exit with 1.
    assert result.returncode == 2
    assert "no_such_engine" in result.stdout + result.stderr
    (run_dir,) = (tmp_path / "outputs" / "mnist_trio_convnet" / "runs").iterdir()
    status = json.loads((run_dir / STATUS_FILE).read_text())
    assert status["status"] == "failed"
    assert status["error"].startswith("UserInputError")


@pytest.mark.slow
def test_multirun_with_ddp(tmp_path, data_root):
    # Each job starts its second DDP process as a single run into the job's own folder.
    result = run_app(
        "-m",
        *FAST,
        f"data.root={data_root}",
        "trainer=ddp_cpu",
        "seed=0,1",
        cwd=tmp_path,
        env=app_env(),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    sweep_dir, jobs = _sweep_jobs(tmp_path)
    assert [job.name for job in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "results.json").is_file(), job
        child_log = (job / "train_ddp_process_1.log").read_text()
        assert f"Seed set to {_overrides(job)['seed']}" in child_log, job
    assert output.count("Wrote ") == 2
    assert len(list(sweep_dir.rglob("multirun.yaml"))) == 1


@pytest.mark.slow
def test_multirun_joblib_parallel(tmp_path, data_root):
    result = run_app(
        "-m",
        *FAST,
        f"data.root={data_root}",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    _, jobs = _sweep_jobs(tmp_path)
    assert [json.loads((job / STATUS_FILE).read_text())["status"] for job in jobs] == ["ok", "ok"]
    assert all((job / "results.json").is_file() for job in jobs)


def test_relative_data_root_resolved(compose_config, tmp_path, monkeypatch):
    cfg = compose_config("data.root=shared/data")
    monkeypatch.chdir(tmp_path / "..")
    resolve_data_root(cfg, "/original/cwd")
    assert cfg.data.root == "/original/cwd/shared/data"


def test_absolute_data_root_kept(compose_config):
    cfg = compose_config("data.root=/data/lws")
    resolve_data_root(cfg, "/original/cwd")
    assert cfg.data.root == "/data/lws"


@pytest.mark.parametrize(
    ("argv", "forwarded"),
    [
        (["-m", "seed=0,1", "model.lr=0.1"], []),
        (["--multirun", "-cn", "mine", "seed=0,1"], ["-cn", "mine"]),
        (["--config-dir=/conf", "-m", "seed=1,2"], ["--config-dir=/conf"]),
        (
            ["-cp", "/abs/conf", "--config-name", "c", "-m"],
            ["-cp", "/abs/conf", "--config-name", "c"],
        ),
    ],
)
def test_config_flags_forwarded(argv, forwarded):
    assert _config_flags(argv) == forwarded


def test_relaunch_argv_is_single_run(compose_config, monkeypatch):
    cfg = compose_config("seed=3", "model.num_banks=2")
    monkeypatch.setattr(sys, "argv", ["lws", "-m", "seed=3,4", "model.num_banks=2", "-cn", "x"])
    relaunch_ddp_as_single_run(cfg.hydra)
    assert sys.argv == ["lws", "-cn", "x", *cfg.hydra.overrides.task]
    assert "seed=3" in sys.argv
    assert cfg.hydra.run.dir == cfg.hydra.runtime.output_dir


def _write_status(job_dir, status: str, num: int) -> None:
    job_dir.mkdir(parents=True)
    record = {
        "status": status,
        "overrides": [f"seed={num}"],
        "job": {"num": num},
        "output_dir": str(job_dir),
    }
    if status == "failed":
        record["error"] = "RuntimeError: out of memory"
    (job_dir / STATUS_FILE).write_text(json.dumps(record))


def test_sweep_summary_exits_on_failure(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _write_status(tmp_path / "0", "ok", 0)
    _write_status(tmp_path / "1", "failed", 1)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit) as exit_info:
        SweepCallback().on_multirun_end(config)
    assert exit_info.value.code == 1
    assert "Job 1 failed with RuntimeError: out of memory" in caplog.text
    assert "1 jobs ok, 1 failed" in caplog.text


def test_sweep_summary_all_ok(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _write_status(tmp_path / "0", "ok", 0)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SweepCallback().on_multirun_end(config)
    assert "1 jobs ok, 0 failed" in caplog.text


def test_sweep_dir_resolves_after_start(tmp_path):
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
    try:
        with initialize_config_module(config_module="lws_lightning.conf", version_base="1.3"):
            config = compose(
                config_name="config",
                overrides=[f"paths.log_dir={tmp_path}"],
                return_hydra_config=True,
            )
        with open_dict(config):
            config.hydra.runtime.cwd = str(tmp_path)
            config.hydra.runtime.choices.experiment = "mnist_trio_convnet"
        SweepCallback().on_multirun_start(config)
        sweep_dir = str(config.hydra.sweep.dir)
    finally:
        GlobalHydra.instance().clear()
    assert sweep_dir.startswith(f"{tmp_path}/mnist_trio_convnet/multiruns/")
