"""In-memory examples of one task and the map-style test set built on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lws_lightning.data.splits import stratified_split
from lws_lightning.errors import CorruptDataError


def to_unit_float(images: Tensor) -> Tensor:
    """Convert uint8 pixels to float32 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


@dataclass
class TaskData:
    """Training and test examples of one task, kept as uint8 to save memory.

    Attributes:
        name: Task name used in logs and results.
        num_classes: Class count. Labels are ``0 .. num_classes - 1``.
        train_images: ``[N, C, H, W]`` uint8 pixels.
        train_labels: ``[N]`` int64 labels.
        test_images: ``[M, C, H, W]`` uint8 pixels.
        test_labels: ``[M]`` int64 labels.
    """

    name: str
    num_classes: int
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    def validate(self, source: str) -> None:
        """Raise CorruptDataError when shapes, dtypes or label ranges are inconsistent.

        Args:
            source: File or folder the examples came from, named in the message.
        """
        check_examples(
            self.name, "training", self.train_images, self.train_labels, self.num_classes, source
        )
        check_examples(
            self.name, "test", self.test_images, self.test_labels, self.num_classes, source
        )


def check_examples(
    task: str, split: str, images: Tensor, labels: Tensor, num_classes: int, source: str
) -> None:
    """Raise CorruptDataError unless ``images`` and ``labels`` form a valid non-empty set.

    Valid means ``[N, C, H, W]`` uint8 images, ``[N]`` int64 labels and every label in
    ``0 .. num_classes - 1``. The message names the task, the split and ``source``.
    """
    problem = None
    if images.dtype != torch.uint8 or images.dim() != 4:
        problem = f"images are {images.dtype} of shape {tuple(images.shape)}"
    elif labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        problem = f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}"
    elif len(labels) == 0:
        problem = "no examples"
    elif labels.min() < 0 or labels.max() >= num_classes:
        problem = (
            f"labels from {int(labels.min())} to {int(labels.max())}, outside 0..{num_classes - 1}"
        )
    if problem is not None:
        raise CorruptDataError(
            f"The {split} set of task {task!r} read from {source} is invalid: {problem}. "
            "Delete the files and fetch them again."
        )


def subsample_task(
    name: str,
    num_classes: int,
    images: Tensor,
    labels: Tensor,
    train_size: int,
    split_seed: int,
    source: str,
    test: tuple[Tensor, Tensor] | None = None,
) -> TaskData:
    """Build a task that trains on a class-stratified subset of ``images``.

    Args:
        name: Task name.
        num_classes: Class count. Labels must lie in ``0 .. num_classes - 1``.
        images: ``[N, C, H, W]`` uint8 pool of training candidates.
        labels: ``[N]`` int64 labels of the pool.
        train_size: Training examples to draw from the pool.
        split_seed: Seed of the draw.
        source: File or folder the pool came from, named in error messages.
        test: Test images and labels. When None, the test set is the rest of the pool.

    Raises:
        CorruptDataError: Shapes or labels are invalid.
        UserInputError: ``train_size`` does not fit the pool.
    """
    check_examples(name, "training", images, labels, num_classes, source)
    chosen, rest = stratified_split(labels.numpy(), train_size, split_seed, f"{name} ({source})")
    if test is None:
        test_images, test_labels = images[rest], labels[rest]
    else:
        test_images, test_labels = test
    task = TaskData(
        name,
        num_classes,
        images[chosen].clone(),
        labels[chosen].clone(),
        test_images,
        test_labels,
    )
    task.validate(source)
    return task


class TestSet(Dataset):
    """Test examples of one task as ``(x [C, H, W] float32 in [0, 1], y int64)`` pairs."""

    __test__ = False  # keeps pytest from collecting this class as a test

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return to_unit_float(self.images[index]), self.labels[index]
