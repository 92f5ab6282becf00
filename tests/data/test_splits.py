"""Seeded splits, task orders and DDP shards."""

from __future__ import annotations

import numpy as np
import pytest

from lws_lightning.data.splits import seeded_order, shard_indices, split_group, stratified_split
from lws_lightning.errors import UserInputError


def test_stratified_split_counts_per_class():
    labels = np.repeat(np.arange(10), 30)
    train, rest = stratified_split(labels, train_size=50, seed=0, source="fake")
    assert len(train) == 50
    assert len(rest) == 250
    assert np.bincount(labels[train], minlength=10).tolist() == [5] * 10
    assert set(train).isdisjoint(rest)
    assert sorted(np.concatenate([train, rest])) == list(range(300))


def test_stratified_split_is_seeded():
    labels = np.repeat(np.arange(4), 25)
    first, _ = stratified_split(labels, 20, seed=3, source="fake")
    again, _ = stratified_split(labels, 20, seed=3, source="fake")
    other, _ = stratified_split(labels, 20, seed=4, source="fake")
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("train_size", [3, 100, 150])
def test_stratified_split_rejects_sizes(train_size):
    labels = np.repeat(np.arange(4), 25)
    with pytest.raises(UserInputError, match=f"train_per_task={train_size}.*fake"):
        stratified_split(labels, train_size, seed=0, source="fake")


def test_split_group_depends_only_on_names():
    train, test = split_group(20, 0.8, 0, "Latin", "character01")
    assert len(train) == 16
    assert len(test) == 4
    assert sorted(np.concatenate([train, test])) == list(range(20))
    again, _ = split_group(20, 0.8, 0, "Latin", "character01")
    assert np.array_equal(train, again)
    other, _ = split_group(20, 0.8, 0, "Latin", "character02")
    assert not np.array_equal(train, other)


def test_split_group_keeps_one_test_example():
    train, test = split_group(2, 0.8, 0, "a", "b")
    assert len(train) == 1
    assert len(test) == 1


def test_seeded_order_ignores_input_order():
    names = [f"alphabet_{i}" for i in range(12)]
    order = seeded_order(names, seed=0)
    assert sorted(order) == sorted(names)
    assert seeded_order(list(reversed(names)), seed=0) == order
    assert seeded_order(names, seed=1) != order


def test_shards_are_disjoint_and_cover():
    rank0 = shard_indices(101, seed=0, task=2, rank=0, world_size=2)
    rank1 = shard_indices(101, seed=0, task=2, rank=1, world_size=2)
    assert set(rank0).isdisjoint(rank1)
    assert sorted(np.concatenate([rank0, rank1])) == list(range(101))
    assert abs(len(rank0) - len(rank1)) <= 1
