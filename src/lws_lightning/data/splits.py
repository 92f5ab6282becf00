"""Seeded train/test splits, task orders and DDP shards.

Every function here is a pure function of its arguments, so every DDP rank and every resumed
run computes the same indices.
"""

from __future__ import annotations

import hashlib

import numpy as np
from sklearn.model_selection import train_test_split

from lws_lightning.errors import UserInputError

# Second entropy word of each kind of seeded draw. NumPy's SeedSequence pads short entropy with
# zeros, so [seed] and [seed, 0] give the same stream. A distinct tag per kind keeps the draws
# of different kinds apart.
NAMED_SPLIT = 1
TASK_ORDER = 2
SHARD = 3
EPOCH_ORDER = 4


def seed_sequence(seed: int, kind: int, *values: int) -> np.random.SeedSequence:
    """Build the seed sequence of one kind of draw. ``seed`` and ``values`` must be >= 0."""
    return np.random.SeedSequence([seed, kind, *values])


def stratified_split(
    labels: np.ndarray, train_size: int, seed: int, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into a class-stratified training subset and the rest.

    Args:
        labels: Class label of each example.
        train_size: Number of training examples to draw.
        seed: Seed of the split.
        source: Dataset name used in error messages.

    Returns:
        Sorted training indices and sorted remaining indices.

    Raises:
        UserInputError: ``train_size`` is not smaller than the dataset, or too small to hold one
            example of every class.
    """
    labels = np.asarray(labels)
    num_classes = len(np.unique(labels))
    if not num_classes <= train_size < len(labels):
        raise UserInputError(
            f"train_per_task={train_size} is invalid for {source}, which has {len(labels)} "
            f"examples in {num_classes} classes. Choose a value from {num_classes} to "
            f"{len(labels) - 1}."
        )
    train, rest = train_test_split(
        np.arange(len(labels)), train_size=train_size, stratify=labels, random_state=seed
    )
    return np.sort(train), np.sort(rest)


def name_seed(seed: int, *names: str) -> np.random.SeedSequence:
    """Build a seed sequence from an integer seed and names, independent of Python's hash salt."""
    digest = hashlib.sha256("\0".join(names).encode("utf-8")).digest()
    words = np.frombuffer(digest, dtype=np.uint32).tolist()
    return seed_sequence(seed, NAMED_SPLIT, *words)


def split_group(
    count: int, train_fraction: float, seed: int, *names: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``count`` examples of one class into train and test positions, seeded by names.

    The split depends only on ``seed`` and ``names``, so it does not change when other classes
    or tasks are added or removed. At least one example goes to each side when ``count >= 2``.

    Returns:
        Sorted train positions and sorted test positions in ``range(count)``.
    """
    order = np.random.default_rng(name_seed(seed, *names)).permutation(count)
    num_train = int(round(train_fraction * count))
    if count >= 2:
        num_train = min(max(num_train, 1), count - 1)
    return np.sort(order[:num_train]), np.sort(order[num_train:])


def seeded_order(names: list[str], seed: int) -> list[str]:
    """Return ``names`` sorted, then shuffled by a permutation seeded with ``seed``."""
    ordered = sorted(names)
    permutation = np.random.default_rng(seed_sequence(seed, TASK_ORDER)).permutation(len(ordered))
    return [ordered[i] for i in permutation]


def shard_indices(size: int, seed: int, task: int, rank: int, world_size: int) -> np.ndarray:
    """Return the positions of one rank's shard of a training set of ``size`` examples.

    All ranks shuffle with the same seeded permutation and take every ``world_size``-th entry
    from their own offset, so the shards of one world size are disjoint and cover the set.
    """
    permutation = np.random.default_rng(seed_sequence(seed, SHARD, task)).permutation(size)
    return permutation[rank::world_size]
