"""Weight counts of the architectures under full, no and mixed sharing."""

from __future__ import annotations

import torch

from lws_lightning.nets import build_net


def test_resnet18_cifar100_counts() -> None:
    # CIFAR-100 as 20 tasks of 5 classes. The LWS paper (arXiv:2003.10159) reports about 11M
    # weights under full sharing and about 223M under no sharing for this ResNet-18.
    net = build_net("resnet18", 1, [5] * 20, (3, 32, 32), variant="cifar")
    full = torch.zeros(8, 20, dtype=torch.long)

    counts = net.weight_counts(full)

    assert abs(counts["full_sharing"] - 11e6) / 11e6 < 0.03
    assert abs(counts["no_sharing"] - 223e6) / 223e6 < 0.03
    # Exact counts, BatchNorm scales and shifts included: stem 1,856, heads 20 × 2,565 = 51,300,
    # residual blocks 11,166,976 per copy.
    assert counts["full_sharing"] == 11_220_132
    assert counts["no_sharing"] == 223_392_676
    assert counts["no_sharing"] == 1_856 + 20 * 11_166_976 + 51_300


def test_dkl_convnet_counts_by_hand() -> None:
    num_classes = [10, 5, 2]
    net = build_net("dkl_convnet", 3, num_classes, (1, 28, 28), width=32, hidden=128)

    # The convs have no bias, and each BatchNorm adds a scale and a shift per channel.
    conv1 = 1 * 32 * 3 * 3 + 2 * 32  # 352
    conv2 = 32 * 32 * 3 * 3 + 2 * 32  # 9,280
    conv3 = conv2
    dense = (32 * 3 * 3) * 128 + 128  # 28 -> 14 -> 7 -> 3 after the pools, so 288 inputs
    heads = sum(128 * classes + classes for classes in num_classes)  # 2,193
    trunk = conv1 + conv2 + conv3 + dense  # 55,904

    full = torch.zeros(4, 3, dtype=torch.long)
    none = torch.tensor([[0, 1, 2]] * 4)
    # Tasks count from 0. Layer 1 is shared by all tasks, layer 2 by tasks 1 and 2 only,
    # layer 3 by none, and layer 4 by all tasks on bank 2.
    mixed = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 1, 2], [2, 2, 2]])

    assert net.weight_count(full) == trunk + heads == 58_097
    assert net.weight_count(none) == 3 * trunk + heads == 169_905
    assert net.weight_count(mixed) == conv1 + 2 * conv2 + 3 * conv3 + dense + heads == 85_937
    assert net.weight_counts(mixed) == {
        "assignment": 85_937,
        "full_sharing": 58_097,
        "no_sharing": 169_905,
    }
