"""Fixtures shared by the test packages: composed Hydra configs that write under tmp_path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

# Tests never reach W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")


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
