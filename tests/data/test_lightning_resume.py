"""A resumed Lightning fit gets the same training batches as an uninterrupted one."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from lws_lightning.data import DklMnistDataModule


class RecordingModule(L.LightningModule):
    """Module that makes one manual optimizer step per batch, like LWSModule, and records labels."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(28 * 28, 10)
        self.seen: list[torch.Tensor] = []

    def on_train_start(self) -> None:
        self.trainer.datamodule.set_start_step(self.global_step)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(y.clone())
        optimizer = self.optimizers()
        loss = nn.functional.cross_entropy(self.layer(x[1, 0].flatten(1)), y[1, 0])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(root, max_steps: int, ckpt_path=None, save_to=None) -> list[torch.Tensor]:
    module = RecordingModule()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    datamodule = DklMnistDataModule(str(root), download=False, train_per_task=30)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module.seen


def test_resume_continues_stream(fake_dkl, tmp_path):
    uninterrupted = fit(fake_dkl.root, max_steps=6)
    checkpoint = tmp_path / "step3.ckpt"
    first = fit(fake_dkl.root, max_steps=3, save_to=checkpoint)
    resumed = fit(fake_dkl.root, max_steps=6, ckpt_path=checkpoint)
    assert len(first) == 3
    assert len(resumed) == 3
    for expected, actual in zip(uninterrupted, first + resumed, strict=True):
        assert torch.equal(expected, actual)
