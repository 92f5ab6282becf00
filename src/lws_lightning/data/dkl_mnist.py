"""DKL-MNIST: EMNIST digits, EMNIST letters and KMNIST as three tasks."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from torch import Tensor
from torchvision.datasets import EMNIST, KMNIST

from lws_lightning.data.download import (
    RemoteFile,
    fetch,
    gunzip,
    move_into,
    staging_folder,
)
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

EMNIST_SPLITS = ("digits", "letters")
KMNIST_FILES = tuple(name.removesuffix(".gz") for name, _ in KMNIST.resources)


def emnist_files(split: str) -> list[str]:
    """Return the raw IDX file names of one EMNIST split, as torchvision 0.29 names them."""
    return [
        f"emnist-{split}-{part}-{kind}-ubyte"
        for part in ("train", "test")
        for kind in ("images-idx3", "labels-idx1")
    ]


def emnist_remote() -> RemoteFile:
    """Return torchvision's EMNIST archive, which contains every split."""
    return RemoteFile(Path(EMNIST.url).name, (EMNIST.url,), EMNIST.md5)


def kmnist_remotes() -> list[RemoteFile]:
    """Return torchvision's gzipped KMNIST IDX files."""
    return remote_gz_files(KMNIST)


def download_emnist(root: Path, names: list[str]) -> None:
    """Download torchvision's EMNIST archive and install the IDX files ``names`` from it."""
    with staging_folder(root, "EMNIST") as staging:
        archive = fetch(emnist_remote(), staging, "EMNIST")
        raw = staging / "EMNIST" / "raw"
        try:
            with zipfile.ZipFile(archive) as members:
                for name in names:
                    members.extract(f"gzip/{name}.gz", staging)
                    gunzip(staging / "gzip" / f"{name}.gz", raw / name)
        except (zipfile.BadZipFile, KeyError) as error:
            raise CorruptDataError(
                f"The EMNIST archive from {emnist_remote().urls[0]} is unusable: {error}. "
                "Retry the download later."
            ) from error
        move_into(raw, root / "EMNIST" / "raw")
    log.info("Installed EMNIST into %s", root / "EMNIST" / "raw")


class DklMnistDataModule(MultiTaskDataModule):
    """EMNIST digits (10 classes), EMNIST letters (26) and KMNIST (10), all 1×28×28.

    Each task trains on ``train_per_task`` examples drawn from its training set, stratified by
    class, and tests on its complete test set (40,000, 20,800 and 10,000 examples). Letters
    arrive from torchvision as 1..26 and become 0..25. torchvision returns EMNIST images
    transposed relative to MNIST, so they are transposed back to stand upright. Files live in
    torchvision's layout: ``root/EMNIST/raw`` and ``root/KMNIST/raw``.

    Args:
        train_per_task: Training examples per task.
        split_seed: Seed of the training subsets. It is separate from ``seed``, so runs with
            different seeds train on the same examples.
        **kwargs: Arguments of :class:`MultiTaskDataModule`.
    """

    dataset_name = "dkl_mnist"

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
    ) -> None:
        super().__init__(root, download, batch_size, eval_batch_size, num_workers, pin_memory, seed)
        self.train_per_task = train_per_task
        self.split_seed = split_seed

    def ensure_files(self, download: bool) -> None:
        emnist_raw = self.root / "EMNIST" / "raw"
        kmnist_raw = self.root / "KMNIST" / "raw"
        emnist_missing = missing_files(
            emnist_raw, [name for split in EMNIST_SPLITS for name in emnist_files(split)]
        )
        kmnist_missing = missing_files(kmnist_raw, KMNIST_FILES)
        if not emnist_missing and not kmnist_missing:
            return
        if not download:
            missing = [f"EMNIST/raw/{name}" for name in emnist_missing]
            missing += [f"KMNIST/raw/{name}" for name in kmnist_missing]
            raise DataNotFoundError(
                self.missing_files_message(
                    f"the files {', '.join(missing)} are",
                    self.root,
                    f"Offline, copy the uncompressed IDX files from {EMNIST.url} (EMNIST) and "
                    f"{KMNIST.mirrors[0]} (KMNIST) into those folders.",
                )
            )
        if emnist_missing:
            download_emnist(self.root, emnist_missing)
        if kmnist_missing:
            download_gz_files(self.root, "KMNIST", kmnist_raw, kmnist_remotes())

    def load_tasks(self) -> list[TaskData]:
        tasks = []
        for split, num_classes, first_label in (("digits", 10, 0), ("letters", 26, 1)):
            train_images, train_labels = self._read_emnist(split, train=True)
            test_images, test_labels = self._read_emnist(split, train=False)
            tasks.append(
                self._subsample(
                    f"emnist_{split}",
                    num_classes,
                    (train_images, train_labels - first_label),
                    (test_images, test_labels - first_label),
                )
            )
        train_images, train_labels = self._read_kmnist(train=True)
        test_images, test_labels = self._read_kmnist(train=False)
        tasks.append(
            self._subsample("kmnist", 10, (train_images, train_labels), (test_images, test_labels))
        )
        return tasks

    def _read_emnist(self, split: str, train: bool) -> tuple[Tensor, Tensor]:
        raw = self.root / "EMNIST" / "raw"
        dataset = load_idx_dataset(
            lambda: EMNIST(str(self.root), split=split, train=train, download=False),
            raw,
            emnist_files(split),
        )
        # [N, W, H] as stored -> [N, 1, H, W], upright like MNIST.
        return dataset.data.transpose(1, 2).contiguous().unsqueeze(1), dataset.targets

    def _read_kmnist(self, train: bool) -> tuple[Tensor, Tensor]:
        dataset = load_idx_dataset(
            lambda: KMNIST(str(self.root), train=train, download=False),
            self.root / "KMNIST" / "raw",
            KMNIST_FILES,
        )
        return dataset.data.unsqueeze(1), dataset.targets

    def _subsample(
        self,
        name: str,
        num_classes: int,
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
    ) -> TaskData:
        images, labels = train
        return subsample_task(
            name,
            num_classes,
            images,
            labels,
            self.train_per_task,
            self.split_seed,
            str(self.root),
            test=test,
        )
