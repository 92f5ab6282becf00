"""Composition of every experiment file and the start-up checks of a run config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from lws_lightning.config_checks import check_config
from lws_lightning.errors import UserInputError
from lws_lightning.lit.module import GENERATOR_STATE_KEY, LWSModule

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))

PAPER_SETTINGS = {
    # name: (iterations, K, NES learning rate)
    "dkl_mnist_convnet": (5000, 3, 0.01),
    "cifar100_convnet": (4000, 20, 0.1),
    "cifar100_resnet18": (20000, 20, 0.1),
    "omniglot_convnet": (20000, 20, 0.01),
    "omniglot_resnet18": (20000, 20, 0.01),
}


def test_experiment_files_present():
    assert set(PAPER_SETTINGS) | {"mnist_trio_convnet"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(compose_config, experiment):
    cfg = compose_config(f"experiment={experiment}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["root"].endswith("/data")
    check_config(cfg)
    assert cfg.experiment_name == experiment
    assert cfg.model.nes_samples == 8
    assert cfg.model.sgd_samples == 8
    assert cfg.model.lr == pytest.approx(1e-3)
    assert cfg.data.batch_size == 16
    assert cfg.trainer.val_check_interval == 200


@pytest.mark.parametrize("experiment", sorted(PAPER_SETTINGS))
def test_experiment_matches_paper(compose_config, experiment):
    cfg = compose_config(f"experiment={experiment}")
    iterations, num_banks, nes_lr = PAPER_SETTINGS[experiment]
    assert cfg.trainer.max_steps == iterations
    assert cfg.model.num_banks == num_banks
    assert cfg.model.nes_lr == pytest.approx(nes_lr)


def test_default_experiment(compose_config):
    cfg = compose_config()
    assert cfg.experiment_name == "mnist_trio_convnet"
    assert cfg.model.architecture == "dkl_convnet"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.num_banks=0", "model.num_banks=0"),
        ("model.nes_samples=1", "model.nes_samples=1"),
        ("model.sgd_samples=0", "model.sgd_samples=0"),
        ("model.nes_lr=0", "model.nes_lr=0"),
        ("model.nes_lr=-0.1", "model.nes_lr=-0.1"),
        ("model.p_min=0.4", "model.p_min=0.4"),
        ("model.sharing=partial", "model.sharing='partial'"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("+trainer.gradient_clip_val=1.0", "model.grad_clip"),
        ("+trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4"),
        ("retain_freed_memory=sometimes", "retain_freed_memory='sometimes'"),
    ],
)
def test_invalid_setting_rejected(compose_config, override, named):
    cfg = compose_config(override)
    with pytest.raises(UserInputError) as error:
        check_config(cfg)
    assert named in str(error.value)


def _run_app(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lws_lightning", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _run_tiny_app(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the app with a narrow net for 2 iterations, with its data root and logs in tmp_path."""
    (tmp_path / "data").mkdir()
    return _run_app(
        *args,
        f"paths.log_dir={tmp_path}",
        "trainer.max_steps=2",
        "+model.architecture_options.width=4",
        "+model.architecture_options.hidden=8",
        cwd=tmp_path,
    )


def test_unknown_experiment_lists_choices(tmp_path):
    result = _run_app("experiment=no_such_experiment", cwd=tmp_path)
    assert result.returncode != 0
    assert "no_such_experiment" in result.stderr
    assert "mnist_trio_convnet" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_override_one_paragraph(tmp_path):
    result = _run_app("model.num_banks=0", f"paths.log_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "model.num_banks=0 is invalid" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_missing_data_root_one_paragraph(tmp_path):
    missing = tmp_path / "no_such_folder"
    result = _run_app(f"data.root={missing}", f"paths.log_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert str(missing) in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_offline_missing_files_named(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    result = _run_app(
        "experiment=dkl_mnist_convnet",
        f"data.root={root}",
        "data.download=false",
        f"paths.log_dir={tmp_path}",
        cwd=tmp_path,
    )
    output = result.stderr + result.stdout
    assert result.returncode == 2
    assert str(root) in output
    assert "EMNIST" in output
    assert "download" in output
    assert "Traceback" not in result.stderr
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.engine=foo", "model.engine='foo'"),
        ("model.architecture=foo", "model.architecture='foo'"),
        ("ckpt_path=/no/such/file.ckpt", "ckpt_path=/no/such/file.ckpt"),
    ],
)
def test_invalid_model_or_checkpoint_one_paragraph(tmp_path, override, named):
    result = _run_tiny_app(override, tmp_path=tmp_path)
    output = result.stderr + result.stdout
    assert result.returncode == 2
    assert named in output
    assert "Traceback" not in result.stderr


def write_checkpoint_of_other_model(path: Path, **settings: Any) -> Path:
    """Save an LWS checkpoint of a DKL ConvNet, by default of width 6 (unlike the tiny runs)."""
    options = {
        "architecture_options": {"width": 6, "hidden": 8},
        "task_names": ["fashion", "digits", "optdigits"],
        **settings,
    }
    module = LWSModule(
        architecture="dkl_convnet",
        num_classes=[10, 10, 10],
        input_shape=(1, 28, 28),
        num_banks=3,
        **options,
    )
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        GENERATOR_STATE_KEY: module.generator.get_state(),
    }
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("kind", ["garbage", "text", "truncated", "other_model", "other_sharing"])
def test_unusable_checkpoint_one_paragraph(tmp_path, kind):
    path = tmp_path / "last.ckpt"
    named = "was written by a run with other model settings"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint")
        named = "is not a readable PyTorch checkpoint"
    elif kind == "text":
        path.write_text("step,loss\n1,0.5\n" * 20)
        named = "is not a readable PyTorch checkpoint"
    elif kind == "truncated":
        write_checkpoint_of_other_model(path)
        path.write_bytes(path.read_bytes()[:1000])
        named = "is not a readable PyTorch checkpoint"
    elif kind == "other_model":
        write_checkpoint_of_other_model(path)
    else:
        # Same weight shapes as the tiny run (3 tasks, K = 3), but no sharing.
        write_checkpoint_of_other_model(
            path, sharing="none", architecture_options={"width": 4, "hidden": 8}
        )
        named = "model.sharing none in the checkpoint, learned here"
    result = _run_tiny_app(f"ckpt_path={path}", tmp_path=tmp_path)
    output = result.stderr + result.stdout
    assert result.returncode == 2
    assert f"ckpt_path={path}" in output
    assert named in output
    assert "Traceback" not in result.stderr
    assert path.read_bytes()
