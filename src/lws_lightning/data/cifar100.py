"""CIFAR-100 split into 20 tasks, one per coarse label (superclass)."""

from __future__ import annotations

import logging
import os
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR100

from lws_lightning.data.download import RemoteFile, fetch, move_into, staging_folder
from lws_lightning.data.multitask import MultiTaskDataModule
from lws_lightning.data.tasks import TaskData
from lws_lightning.errors import CorruptDataError, DataNotFoundError

log = logging.getLogger(__name__)

FOLDER = CIFAR100.base_folder
FILES = ("train", "test", "meta")
NUM_FINE = 100
NUM_COARSE = 20
FINE_PER_COARSE = NUM_FINE // NUM_COARSE
PIXELS = 3 * 32 * 32


class _CIFAR100Files(CIFAR100):
    """torchvision's CIFAR100 that accepts files without checking their MD5 sums.

    torchvision rejects files whose MD5 differs from the official archive. This data module
    checks the pickles' structure itself instead (see :func:`read_pickle`), so the same loading
    code also reads small generated copies in tests.
    """

    def _check_integrity(self) -> bool:
        return all(
            os.path.isfile(os.path.join(self.root, self.base_folder, name))
            for name, _ in self.train_list + self.test_list
        )

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}


def cifar100_remote() -> RemoteFile:
    """Return torchvision's CIFAR-100 archive."""
    return RemoteFile(CIFAR100.filename, (CIFAR100.url,), CIFAR100.tgz_md5)


def read_pickle(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Load a CIFAR pickle as torchvision does and check that it contains ``keys``.

    Raises:
        CorruptDataError: The file is truncated, not a pickle, or lacks a key.
    """
    # Unpickling runs code from the file, as in torchvision's CIFAR100, so read trusted files only.
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise CorruptDataError(
            f"{path} is not a readable CIFAR-100 pickle ({type(error).__name__}: {error}). The "
            "file is truncated or damaged. Delete the folder and fetch it again."
        ) from error
    missing = [key for key in keys if not isinstance(content, dict) or key not in content]
    if missing:
        raise CorruptDataError(
            f"{path} lacks the keys {missing} of a CIFAR-100 pickle. Delete the folder and fetch "
            "it again."
        )
    return content


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the fine and coarse labels of a ``train`` or ``test`` pickle after checking them."""
    content = read_pickle(path, ("data", "fine_labels", "coarse_labels"))
    data = np.asarray(content["data"])
    fine = np.asarray(content["fine_labels"], dtype=np.int64)
    coarse = np.asarray(content["coarse_labels"], dtype=np.int64)
    problem = None
    if data.ndim != 2 or data.shape[1] != PIXELS:
        problem = f"data of shape {data.shape}, expected (N, {PIXELS})"
    elif not len(fine) == len(coarse) == len(data):
        problem = f"{len(data)} images, {len(fine)} fine and {len(coarse)} coarse labels"
    elif len(data) == 0:
        problem = "no images"
    elif fine.min() < 0 or fine.max() >= NUM_FINE or coarse.min() < 0 or coarse.max() >= NUM_COARSE:
        problem = f"labels outside 0..{NUM_FINE - 1} (fine) or 0..{NUM_COARSE - 1} (coarse)"
    if problem is not None:
        raise CorruptDataError(f"{path} is not a valid CIFAR-100 file: {problem}. Fetch it again.")
    return fine, coarse


def fine_classes_by_task(fine: np.ndarray, coarse: np.ndarray, source: Path) -> list[list[int]]:
    """Return, for each coarse label, its fine labels in ascending order.

    Raises:
        CorruptDataError: A fine label has two coarse labels, or a coarse label does not have
            exactly five fine labels.
    """
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0)
    if len(np.unique(pairs[:, 0])) != len(pairs):
        raise CorruptDataError(
            f"{source} gives some fine label two different coarse labels. Fetch it again."
        )
    groups = [sorted(pairs[pairs[:, 1] == task, 0].tolist()) for task in range(NUM_COARSE)]
    sizes = [len(group) for group in groups]
    if any(size != FINE_PER_COARSE for size in sizes):
        raise CorruptDataError(
            f"{source} has coarse labels with {sizes} fine labels each, but CIFAR-100 has "
            f"{FINE_PER_COARSE} per coarse label. Fetch it again."
        )
    return groups


class Cifar100TasksDataModule(MultiTaskDataModule):
    """Twenty 5-way tasks from CIFAR-100's coarse labels, 3×32×32 RGB in [0, 1].

    Task ``t`` contains every image whose coarse label is ``t`` (2,500 training and 500 test
    images). Its five fine classes map to labels 0..4 in ascending fine-label order. Coarse
    labels come from the ``coarse_labels`` key of the pickles ``cifar-100-python/train`` and
    ``test`` that torchvision's ``CIFAR100`` reads, and task names from ``meta``.

    Args:
        **kwargs: Arguments of :class:`MultiTaskDataModule`.
    """

    dataset_name = "cifar100_tasks"

    def ensure_files(self, download: bool) -> None:
        folder = self.root / FOLDER
        missing = [name for name in FILES if not (folder / name).is_file()]
        if not missing:
            return
        if not download:
            raise DataNotFoundError(
                self.missing_files_message(
                    f"the CIFAR-100 files {', '.join(missing)} are",
                    folder,
                    f"Offline, unpack {CIFAR100.url} into {self.root}.",
                )
            )
        with staging_folder(self.root, "CIFAR100") as staging:
            archive = fetch(cifar100_remote(), staging, "CIFAR-100")
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    _extract_all(tar, staging)
            except (tarfile.TarError, EOFError, zlib.error) as error:
                raise CorruptDataError(
                    f"Cannot unpack the CIFAR-100 archive from {CIFAR100.url}: {error}. Retry "
                    "the download later."
                ) from error
            move_into(staging / FOLDER, folder)
        log.info("Installed CIFAR-100 into %s", folder)

    def load_tasks(self) -> list[TaskData]:
        folder = self.root / FOLDER
        train_fine, train_coarse = read_split(folder / "train")
        test_fine, test_coarse = read_split(folder / "test")
        meta = read_pickle(folder / "meta", ("fine_label_names", "coarse_label_names"))
        names = list(meta["coarse_label_names"])
        if len(names) != NUM_COARSE:
            raise CorruptDataError(
                f"{folder / 'meta'} names {len(names)} coarse labels, expected {NUM_COARSE}. "
                "Fetch it again."
            )
        groups = fine_classes_by_task(train_fine, train_coarse, folder / "train")
        if fine_classes_by_task(test_fine, test_coarse, folder / "test") != groups:
            raise CorruptDataError(
                f"{folder / 'train'} and {folder / 'test'} group the fine labels differently. "
                "Fetch the dataset again."
            )
        train_images = self._read_images(True, train_fine)
        test_images = self._read_images(False, test_fine)

        tasks = []
        for task, fine_labels in enumerate(groups):
            relabel = np.full(NUM_FINE, -1, dtype=np.int64)
            relabel[fine_labels] = np.arange(FINE_PER_COARSE)
            train = np.flatnonzero(train_coarse == task)
            test = np.flatnonzero(test_coarse == task)
            task_data = TaskData(
                names[task],
                FINE_PER_COARSE,
                train_images[train],
                torch.from_numpy(relabel[train_fine[train]]),
                test_images[test],
                torch.from_numpy(relabel[test_fine[test]]),
            )
            task_data.validate(str(folder))
            tasks.append(task_data)
        return tasks

    def _read_images(self, train: bool, fine: np.ndarray) -> Tensor:
        """Read one split through torchvision as ``[N, 3, 32, 32]`` uint8."""
        dataset = _CIFAR100Files(str(self.root), train=train, download=False)
        if not np.array_equal(np.asarray(dataset.targets), fine):
            raise CorruptDataError(
                f"torchvision read other fine labels from {self.root / FOLDER} than the pickle "
                "holds. Fetch the dataset again."
            )
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()


def _extract_all(tar: tarfile.TarFile, folder: Path) -> None:
    # The "data" filter rejects absolute paths and links that leave ``folder``. Python releases
    # older than the filter lack ``tarfile.data_filter`` and extract without it.
    if hasattr(tarfile, "data_filter"):
        tar.extractall(folder, filter="data")
    else:
        tar.extractall(folder)
