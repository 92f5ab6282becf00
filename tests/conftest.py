"""Fixtures shared by the test packages: composed Hydra configs that write under tmp_path.

``lws_multirun`` runs a small multirun of the default experiment once per session; the report,
export and logger tests read its folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

# Tests never reach W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")
# The tests' tensors are tiny, and a second OpenMP thread only spins when other processes share
# the 2 cores: one thread ran a 5-step ResNet test 10x faster on a busy machine. Subprocesses
# (CLI runs, DDP workers) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def compose_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/config.yaml`` with overrides, as ``python -m lws_lightning`` would.

    Outputs go to ``tmp_path/run``. The Hydra config is registered, so ``${hydra:...}``
    interpolations resolve as in a real run.
    """

    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="lws_lightning.conf", version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[f"paths.log_dir={tmp_path}/outputs", *overrides],
                return_hydra_config=True,
            )
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
            cfg.hydra.runtime.cwd = str(tmp_path)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@dataclass(frozen=True)
class Multirun:
    """A finished ``python -m lws_lightning -m`` sweep: its folder and each job's folder."""

    sweep_dir: Path
    jobs: dict[tuple[str, int], Path]  # (model.sharing, seed) -> job folder
    data_dir: Path  # paths.data_dir of the jobs, holding the installed mnist_trio files
    wandb_env: dict[str, str]  # WANDB_* variables: offline mode, folders under the session tmp


# Sharing modes and seeds of the session multirun: the rows of the report's error table, two
# seeds each.
MULTIRUN_SHARING = ("learned", "full", "none")
MULTIRUN_SEEDS = (0, 1)


@pytest.fixture(scope="session")
def lws_multirun(tmp_path_factory: pytest.TempPathFactory) -> Multirun:
    """Run 2 seeds x 3 sharing modes of mnist_trio_convnet for 4 iterations each, once per session.

    Every job logs to CSV, TensorBoard and W&B (offline). Evaluation reads 2 batches of 64 per task.
    The jobs run in one subprocess, as Hydra's default launcher does, in about 30 to 60 s on two
    busy CPU cores.
    """
    from lws_lightning.data.mnist_trio import DEFAULT_FASHION_SOURCE

    if not (Path(DEFAULT_FASHION_SOURCE) / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(
            f"Fashion-MNIST is not installed in {DEFAULT_FASHION_SOURCE}; run "
            "scripts/install_data.sh."
        )
    root = tmp_path_factory.mktemp("multirun")
    (root / "data").mkdir()
    wandb_env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **{
            name: str(root / "wandb_home" / name.lower())
            for name in (
                "WANDB_DIR",
                "WANDB_CACHE_DIR",
                "WANDB_CONFIG_DIR",
                "WANDB_DATA_DIR",
                "WANDB_ARTIFACT_DIR",
            )
        },
    }
    command = [
        sys.executable,
        "-m",
        "lws_lightning",
        "-m",
        f"model.sharing={','.join(MULTIRUN_SHARING)}",
        f"seed={','.join(str(seed) for seed in MULTIRUN_SEEDS)}",
        "debug=smoke",
        "logger=[csv,wandb,tensorboard]",
        f"paths.log_dir={root / 'outputs'}",
        f"paths.data_dir={root / 'data'}",
        "data.download=false",
        "data.eval_batch_size=64",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        "model.nes_samples=2",
        "model.sgd_samples=2",
        "callbacks.progress_bar.refresh_rate=0",
    ]
    env = {**os.environ, **wandb_env, "HYDRA_FULL_ERROR": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    output = completed.stdout + completed.stderr
    (root / "multirun.log").write_text(output)
    assert completed.returncode == 0, f"The multirun failed:\n{output[-6000:]}"

    (sweep_dir,) = (root / "outputs" / "mnist_trio_convnet" / "multiruns").iterdir()
    jobs = {}
    for job_dir in sorted(path for path in sweep_dir.iterdir() if path.is_dir()):
        overrides = dict(
            item.split("=", 1)
            for item in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        )
        jobs[(overrides["model.sharing"], int(overrides["seed"]))] = job_dir
    assert len(jobs) == len(MULTIRUN_SHARING) * len(MULTIRUN_SEEDS), output[-6000:]
    return Multirun(sweep_dir, jobs, root / "data", wandb_env)
