"""The Lightning module on the offline benchmark: equivalence with the core, resume, modes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from lws_lightning.data import MnistTrioDataModule
from lws_lightning.engine import StepConfig, lws_step
from lws_lightning.lit import LWSModule
from lws_lightning.lit.progress import IterationProgressBar
from lws_lightning.run import train

# A narrow DKL ConvNet keeps these runs at a fraction of a second per iteration.
TINY_NET = {"architecture": "dkl_convnet", "architecture_options": {"width": 8, "hidden": 16}}


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> MnistTrioDataModule:
    root = tmp_path_factory.mktemp("data")
    datamodule = MnistTrioDataModule(root=str(root), download=False, seed=0)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def _module(trio: MnistTrioDataModule, **overrides) -> LWSModule:
    settings = {"num_banks": 3, "nes_lr": 0.1, "seed": 7, **TINY_NET, **overrides}
    torch.manual_seed(0)
    return LWSModule(
        num_classes=trio.num_classes,
        input_shape=trio.input_shape,
        task_names=trio.task_names,
        **settings,
    )


def _trainer(tmp_path: Path, max_steps: int, **options) -> L.Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "max_epochs": -1,
        "limit_val_batches": 0,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**settings, **options})


def _state(module: LWSModule) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def test_module_matches_core_step(trio, tmp_path):
    steps = 3
    module = _module(trio, engine="literal")
    reference = _module(trio, engine="literal")
    _trainer(tmp_path, steps, enable_checkpointing=False).fit(module, datamodule=trio)

    trio.set_start_step(0)
    optimizer = torch.optim.Adam(reference.net.parameters(), lr=reference.hparams.lr)
    generator = torch.Generator().manual_seed(7)
    config = StepConfig(nes_samples=8, sgd_samples=8, nes_lr=0.1)
    batches = iter(trio.train_dataloader())
    for _ in range(steps):
        x, y = next(batches)
        lws_step(
            reference.net,
            reference.distribution,
            optimizer,
            (x[0], y[0]),
            (x[1], y[1]),
            config,
            generator,
        )

    assert module.global_step == steps
    torch.testing.assert_close(module.distribution.probs, reference.distribution.probs)
    trained, expected = _state(module), _state(reference)
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], msg=key)


def test_resume_matches_uninterrupted(trio, tmp_path):
    uninterrupted = _module(trio)
    _trainer(tmp_path / "full", 20, enable_checkpointing=False).fit(uninterrupted, datamodule=trio)

    first = _module(trio)
    first_trainer = _trainer(tmp_path / "first", 10, enable_checkpointing=False)
    first_trainer.fit(first, datamodule=trio)
    checkpoint = tmp_path / "step10.ckpt"
    first_trainer.save_checkpoint(checkpoint)

    resumed = _module(trio, seed=999)  # The checkpoint must restore the sampler's state too.
    resumed_trainer = _trainer(tmp_path / "resumed", 20, enable_checkpointing=False)
    resumed_trainer.fit(resumed, datamodule=trio, ckpt_path=checkpoint)

    assert resumed.global_step == 20
    torch.testing.assert_close(resumed.distribution.probs, uninterrupted.distribution.probs)
    final, expected = _state(resumed), _state(uninterrupted)
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], msg=key)


def test_global_step_counts_iterations(trio, tmp_path):
    calls = []

    class CountSteps(L.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            calls.append(1)

    module = _module(trio)
    _trainer(tmp_path, 7, enable_checkpointing=False, callbacks=[CountSteps()]).fit(
        module, datamodule=trio
    )
    assert module.global_step == 7
    assert len(calls) == 7


def test_checkpoint_restores_without_hydra(trio, tmp_path):
    module = _module(trio)
    trainer = _trainer(tmp_path, 4, enable_checkpointing=False)
    trainer.fit(module, datamodule=trio)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    restored = LWSModule.load_from_checkpoint(path)
    torch.testing.assert_close(restored.distribution.probs, module.distribution.probs)
    assert restored.task_names == module.task_names
    torch.testing.assert_close(restored.generator.get_state(), module.generator.get_state())


@pytest.mark.parametrize("sharing", ["learned", "full", "none"])
def test_app_run_writes_outputs(compose_config, tmp_path, sharing):
    cfg = compose_config(
        f"model.sharing={sharing}",
        "+model.architecture_options.width=8",
        "+model.architecture_options.hidden=16",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "logger=csv",
        f"data.root={tmp_path}",
    )
    results = train(cfg)
    output = Path(cfg.paths.output_dir)

    saved = json.loads((output / "results.json").read_text())
    assert saved["sharing"] == sharing
    assert saved["steps"] == 20
    expected_banks = {"learned": 3, "full": 1, "none": 3}[sharing]
    assert saved["banks_per_layer"] == [expected_banks] * 4
    assert set(saved["test"]["error_per_task"]) == {"fashion", "digits", "optdigits"}
    assert 0.0 <= saved["test"]["error"] <= 1.0
    assert len(saved["history"]) == 2
    assert (output / "assignment.png").stat().st_size > 1000
    assert (output / "last.ckpt").is_file()
    assert results["weights"] == saved["weights"]
    counts = saved["weights"]
    assert counts["full_sharing"] < counts["no_sharing"]
    if sharing == "full":
        assert counts["assignment"] == counts["full_sharing"]
    if sharing == "none":
        assert counts["assignment"] == counts["no_sharing"]


class CheckpointProbe(L.Callback):
    """Read last.ckpt, if present, before each training step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[tuple[int, int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.path.is_file():
            saved = torch.load(self.path, weights_only=False)
            steps = [entry["step"] for entry in saved["lws_history"]]
            self.seen.append((trainer.global_step, saved["global_step"], steps))


def test_checkpoint_after_each_evaluation(compose_config, trio, tmp_path):
    """During training, last.ckpt follows each evaluation and its history includes it."""
    cfg = compose_config("trainer.val_check_interval=2")
    callback = instantiate(cfg.callbacks.model_checkpoint, dirpath=str(tmp_path / "checkpoints"))
    probe = CheckpointProbe(tmp_path / "checkpoints" / "last.ckpt")
    trainer = _trainer(
        tmp_path,
        6,
        limit_val_batches=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[callback, probe],
    )
    trainer.fit(_module(trio), datamodule=trio)

    # Before steps 3 to 6 (global_step 2 to 5), the file contains the last evaluated step.
    assert probe.seen == [(2, 2, [2]), (3, 2, [2]), (4, 4, [2, 4]), (5, 4, [2, 4])]
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 6
    assert [entry["step"] for entry in saved["lws_history"]] == [2, 4, 6]


def test_resumed_app_run_keeps_history(compose_config, tmp_path):
    """A run resumed from last.ckpt continues the history, and last.ckpt has the final step."""
    common = (
        "+model.architecture_options.width=8",
        "+model.architecture_options.hidden=16",
        "trainer.val_check_interval=2",
        "logger=csv",
        f"data.root={tmp_path}",
    )
    cfg = compose_config(*common, "trainer.max_steps=5")
    first = train(cfg)
    checkpoint = tmp_path / "step5.ckpt"
    shutil.copy(Path(cfg.paths.output_dir) / "last.ckpt", checkpoint)
    saved = torch.load(checkpoint, weights_only=False)

    resumed = train(compose_config(*common, "trainer.max_steps=6", f"ckpt_path={checkpoint}"))

    assert [entry["step"] for entry in first["history"]] == [2, 4]
    assert saved["global_step"] == 5
    assert saved["lws_history"] == first["history"]
    assert resumed["steps"] == 6
    assert [entry["step"] for entry in resumed["history"]] == [2, 4, 6]
    assert resumed["history"][:2] == first["history"]


def test_resume_past_max_steps_warns(compose_config, tmp_path, caplog):
    """Resuming a checkpoint at or past trainer.max_steps warns that nothing trains."""
    common = (
        "+model.architecture_options.width=8",
        "+model.architecture_options.hidden=16",
        "trainer.val_check_interval=2",
        "logger=none",
        f"data.root={tmp_path}",
    )
    cfg = compose_config(*common, "trainer.max_steps=4")
    train(cfg)
    checkpoint = tmp_path / "step4.ckpt"
    shutil.copy(Path(cfg.paths.output_dir) / "last.ckpt", checkpoint)

    with caplog.at_level(logging.WARNING, logger="lws_lightning.run"):
        resumed = train(compose_config(*common, "trainer.max_steps=3", f"ckpt_path={checkpoint}"))

    assert resumed["steps"] == 4
    assert [entry["step"] for entry in resumed["history"]] == [2, 4]
    expected = (
        f"ckpt_path={checkpoint} finished 4 iterations, and trainer.max_steps=3 is not above "
        "that, so this run trains no further"
    )
    assert expected in caplog.text


def test_progress_bar_counts_resumed_iterations(compose_config, trio, tmp_path):
    """The bar counts global steps, from the checkpoint's step in a resumed run."""
    # As in the app: last.ckpt written by the checkpoint callback during training.
    cfg = compose_config()
    callback = instantiate(cfg.callbacks.model_checkpoint, dirpath=str(tmp_path / "checkpoints"))
    first = _trainer(
        tmp_path,
        2,
        limit_val_batches=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    first.fit(_module(trio), datamodule=trio)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"

    bar = IterationProgressBar()
    resumed = _trainer(tmp_path, 4, enable_progress_bar=True, callbacks=[bar])
    resumed.fit(_module(trio), datamodule=trio, ckpt_path=checkpoint)

    assert bar.train_progress_bar.initial == 2
    assert bar.train_progress_bar.n == 4
    assert bar.train_progress_bar.total == 4
    assert bar.train_progress_bar.desc.startswith("LWS iteration")
