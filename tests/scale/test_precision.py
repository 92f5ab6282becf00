"""Mixed precision under manual optimization: bf16-mixed runs, 16-mixed scales and unscales."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy

from lws_lightning.errors import UserInputError
from lws_lightning.run import _check_trainer, build_module, train

from .conftest import HERE

TINY_IN_PROCESS = (
    "logger=none",
    "+model.architecture_options.width=4",
    "+model.architecture_options.hidden=8",
    "model.nes_samples=4",
    "model.sgd_samples=2",
    "data.batch_size=4",
    "data.eval_batch_size=64",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
)


def test_bf16_mixed_run_on_cpu(compose_config, data_root, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    cfg = compose_config(
        *TINY_IN_PROCESS,
        f"data.root={data_root}",
        "trainer.precision=bf16-mixed",
        "+callbacks.activations._target_=scale_callbacks.ActivationRecorder",
        f"+callbacks.activations.out_dir={tmp_path / 'activations'}",
    )
    results = train(cfg)

    assert results["steps"] == 3
    assert math.isfinite(results["test"]["error"])
    assert (tmp_path / "run" / "results.json").is_file()
    counts = json.loads((tmp_path / "activations" / "activations.json").read_text())
    # NES evaluations: eval mode, no gradients, under the same bf16 autocast as the SGD passes.
    assert counts.get("eval/no_grad/torch.bfloat16", 0) > 0, counts
    assert counts.get("train/grad/torch.bfloat16", 0) > 0, counts
    assert not [key for key in counts if not key.endswith("torch.bfloat16")], counts


class _ScalerSpy:
    """Wrap a GradScaler's methods to record the order of scale, unscale_, step and clipping."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self.events: list[str] = []
        for name in ("scale", "unscale_", "step", "update"):
            setattr(scaler, name, self._wrap(name, getattr(scaler, name)))

    def _wrap(self, name, method):
        def wrapped(*args, **kwargs):
            self.events.append(name)
            return method(*args, **kwargs)

        return wrapped

    def stage(self, optimizer: torch.optim.Optimizer) -> str:
        return self.scaler._per_optimizer_states[id(optimizer)]["stage"].name


def test_16_mixed_clips_unscaled_gradients(compose_config, data_root, tmp_path, monkeypatch):
    # Lightning turns precision=16-mixed into bf16-mixed on CPUs, so the plugin is built by
    # hand with a CPU gradient scaler. The module then receives the same calls as on a GPU.
    cfg = compose_config(
        *TINY_IN_PROCESS,
        f"data.root={data_root}",
        "model.grad_clip=1e-3",
        "model.sgd_samples=3",
        # The literal engine runs one scaled backward pass per sample, which the call order
        # below expects; the batched engine runs one for all samples.
        "model.engine=literal",
    )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    spy = _ScalerSpy(torch.amp.GradScaler("cpu"))
    clip_stages: list[str] = []
    clip_norms: list[float] = []
    clip_gradients = module.clip_gradients

    def recording_clip(optimizer, **kwargs):
        spy.events.append("clip")
        clip_stages.append(spy.stage(optimizer))
        clip_gradients(optimizer, **kwargs)
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        clip_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    monkeypatch.setattr(module, "clip_gradients", recording_clip)
    monkeypatch.syspath_prepend(str(HERE))
    from scale_callbacks import ActivationRecorder

    activations = ActivationRecorder(str(tmp_path / "activations"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=spy.scaler)],
        callbacks=[activations],
    )
    trainer.fit(module, datamodule=datamodule)

    assert trainer.global_step == 2
    # Per iteration: one scaled backward pass per SGD sample, then unscale, clip, step, update.
    one_step = ["scale"] * 3 + ["unscale_", "clip", "step", "update"]
    assert spy.events == one_step * 2
    assert clip_stages == ["UNSCALED", "UNSCALED"]
    for norm in clip_norms:
        assert norm <= 1e-3 * (1 + 1e-3)
    assert activations.counts["eval/no_grad/torch.float16"] > 0, activations.counts
    assert activations.counts["train/grad/torch.float16"] > 0, activations.counts


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, **kwargs)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_true_precisions_rejected(precision):
    with pytest.raises(UserInputError, match=f"trainer.precision={precision}"):
        _check_trainer(_trainer(accelerator="cpu", devices=1, precision=precision))


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_supported_precisions_accepted(precision):
    _check_trainer(_trainer(accelerator="cpu", devices=1, precision=precision))


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_ddp_spawn_rejected(start_method):
    trainer = _trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(start_method=start_method)
    )
    with pytest.raises(UserInputError, match="trainer=ddp"):
        _check_trainer(trainer)


def test_ddp_popen_accepted():
    _check_trainer(_trainer(accelerator="cpu", devices=2, strategy=DDPStrategy()))
