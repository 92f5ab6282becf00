"""Composition of the sweep launcher configs; nothing is submitted to SLURM here."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

# Hydra's plugin discovery imports the launcher modules itself, so the classes are compared by
# qualified name: an isinstance check against a second import of the module would fail.
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def _qualified_name(value: object) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


@pytest.fixture(autouse=True)
def _no_root_override(monkeypatch):
    monkeypatch.delenv("LWS_ROOT_DIR", raising=False)


def test_slurm_launcher_one_task_per_gpu(compose_config, tmp_path):
    cfg = compose_config(
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == SLURM_LAUNCHER
    assert launcher["tasks_per_node"] == 4
    assert launcher["gpus_per_node"] == 4
    assert launcher["nodes"] == 2
    assert launcher["setup"] == [f"export LWS_ROOT_DIR='{tmp_path}'"]
    sweep_dir = f"{tmp_path}/outputs/mnist_trio_convnet/multiruns/"
    assert launcher["submitit_folder"].startswith(sweep_dir)

    built = instantiate(cfg.hydra.launcher)
    assert _qualified_name(built) == SLURM_LAUNCHER
    assert built.params["tasks_per_node"] == 4
    assert built.params["timeout_min"] == 600


def test_slurm_launcher_single_gpu_defaults(compose_config):
    cfg = compose_config("hydra/launcher=slurm", "trainer=gpu")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["nodes"] == 1
    assert launcher["tasks_per_node"] == 1
    assert launcher["gpus_per_node"] == 1


def test_plugin_slurm_launcher_composes(compose_config):
    cfg = compose_config("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu")
    built = instantiate(cfg.hydra.launcher)
    assert _qualified_name(built) == SLURM_LAUNCHER
    assert built.params["partition"] == "gpu"


@pytest.mark.parametrize("name", ["parallel", "joblib"])
def test_joblib_launchers_compose(compose_config, name):
    cfg = compose_config(f"hydra/launcher={name}", "hydra.launcher.n_jobs=3")
    built = instantiate(cfg.hydra.launcher)
    assert _qualified_name(built) == JOBLIB_LAUNCHER
    assert built.joblib["n_jobs"] == 3
    assert built.joblib["prefer"] == "processes"


def test_sweep_callback_configured(compose_config):
    cfg = compose_config()
    assert cfg.hydra.callbacks.sweep._target_ == "lws_lightning.jobs.SweepCallback"
