"""Max-pooling before ReLU gives the values and gradients of ReLU before max-pooling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lws_lightning.engine._pool_first import pool_before_relu

POOLS = {
    "2x2": nn.MaxPool2d(2),
    "3x3_stride2_padded": nn.MaxPool2d(3, stride=2, padding=1),
    "ceil_mode": nn.MaxPool2d(2, ceil_mode=True),
    "1d": nn.MaxPool1d(2),
}


@pytest.mark.parametrize("pool", list(POOLS.values()), ids=list(POOLS))
@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu_inplace"])
def test_swapped_pair_matches(pool: nn.Module, inplace: bool) -> None:
    """Values and input gradients agree, with ties, zeros and all-negative windows."""
    generator = torch.Generator().manual_seed(0)
    shape = (2, 3, 7, 7) if isinstance(pool, nn.MaxPool2d) else (2, 3, 9)
    # Small integers make ties, zero maxima and all-negative windows common.
    x = torch.randint(-3, 3, shape, generator=generator).double()
    net = nn.Sequential(nn.Identity(), nn.ReLU(inplace=inplace), pool, nn.Tanh())
    outputs, grads = [], []
    upstream = None
    for swap in (False, True):
        leaf = x.clone().requires_grad_()
        with pool_before_relu(net) if swap else torch.enable_grad():
            assert ("forward" in vars(net)) == swap
            out = net(leaf * 1.0)
        if upstream is None:
            upstream = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        out.backward(upstream)
        outputs.append(out.detach())
        grads.append(leaf.grad)
    assert "forward" not in vars(net)
    assert torch.equal(outputs[1], outputs[0])
    assert torch.equal(grads[1].abs() > 0, grads[0].abs() > 0)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_pairs_with_indices_or_hooks_keep_their_order() -> None:
    with_indices = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
    hooked = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    hooked[0].register_forward_hook(lambda *_: None)
    other_order = nn.Sequential(nn.MaxPool2d(2), nn.ReLU())
    with pool_before_relu(nn.ModuleList([with_indices, hooked, other_order])):
        for container in (with_indices, hooked, other_order):
            assert "forward" not in vars(container)
