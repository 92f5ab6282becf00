"""Checks on a composed run config, made before anything is built or written."""

from __future__ import annotations

from omegaconf import DictConfig

from lws_lightning.errors import UserInputError
from lws_lightning.sharing import SharingMode


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`UserInputError` naming the first invalid setting and its fix."""
    model = cfg.model
    try:
        mode = SharingMode.parse(model.sharing)
    except ValueError as error:
        raise UserInputError(str(error)) from None

    if mode in (SharingMode.LEARNED, SharingMode.FIXED) and int(model.num_banks) < 1:
        raise UserInputError(
            f"model.num_banks={model.num_banks} is invalid: every shareable layer needs K >= 1 "
            "banks. Set model.num_banks=3, for example."
        )
    if int(model.nes_samples) < 2:
        raise UserInputError(
            f"model.nes_samples={model.nes_samples} is invalid: the rank-based NES update needs "
            "at least 2 samples. Set model.nes_samples=8, the LWS default."
        )
    if int(model.sgd_samples) < 1:
        raise UserInputError(
            f"model.sgd_samples={model.sgd_samples} is invalid: use at least 1 sample per "
            "gradient step (the LWS default is 8)."
        )
    if float(model.nes_lr) <= 0:
        raise UserInputError(
            f"model.nes_lr={model.nes_lr} is invalid: the NES learning rate must be positive, "
            "e.g. model.nes_lr=0.01."
        )
    if float(model.lr) <= 0:
        raise UserInputError(f"model.lr={model.lr} is invalid: the Adam learning rate must be > 0.")
    p_min = float(model.p_min)
    if mode is SharingMode.LEARNED and (p_min < 0 or p_min * int(model.num_banks) >= 1):
        raise UserInputError(
            f"model.p_min={p_min} is invalid with model.num_banks={model.num_banks}: p_min * K "
            f"must lie in [0, 1), so choose p_min below {1 / int(model.num_banks):g}."
        )
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps is None or int(max_steps) < 1:
        raise UserInputError(
            f"trainer.max_steps={max_steps} is invalid: it counts LWS iterations and must be >= 1."
        )
    if int(cfg.data.get("batch_size", 1)) < 1:
        raise UserInputError(f"data.batch_size={cfg.data.batch_size} is invalid: use at least 1.")
    # Lightning applies these two only under automatic optimization; LWS optimizes manually,
    # so a set value would be silently ignored.
    clip = cfg.trainer.get("gradient_clip_val")
    if clip is not None:
        raise UserInputError(
            f"trainer.gradient_clip_val={clip} has no effect under manual optimization; "
            f"set model.grad_clip={clip} instead."
        )
    accumulate = cfg.trainer.get("accumulate_grad_batches")
    if accumulate not in (None, 1):
        raise UserInputError(
            f"trainer.accumulate_grad_batches={accumulate} has no effect under manual "
            "optimization; raise data.batch_size or model.sgd_samples instead."
        )
    retain = cfg.get("retain_freed_memory", False)
    if not isinstance(retain, bool):
        raise UserInputError(
            f"retain_freed_memory={retain!r} is invalid: set it to true (keep freed memory for "
            "reuse, faster) or false (return it to the system)."
        )
