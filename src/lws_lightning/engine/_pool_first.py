"""Max-pooling before ReLU: the same values and gradients, with ReLU on the pooled map.

ReLU is monotone, so ``max_pool(relu(x)) == relu(max_pool(x))`` for any max-pooling (its
padding is -inf, so every window keeps at least one real element). With pooling first, ReLU
and its backward run on the pooled map, a quarter of the elements for 2×2 pooling, and the
ReLU before pooling no longer makes a pass over the largest activations of a block.

Gradients agree too. Where a window's maximum is positive, both orders route the gradient to
the same first maximal element. Where it is 0 or negative, both orders give the whole window a
zero gradient, because ReLU's gradient at 0 is 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


@contextmanager
def pool_before_relu(net: nn.Module) -> Iterator[None]:
    """Inside the context, run each ``nn.Sequential``'s ReLU, max-pool pairs as max-pool, ReLU.

    A pair qualifies where an ``nn.ReLU`` runs directly before a max-pooling module that
    returns no indices, and neither has hooks.
    """
    containers = [
        module
        for module in net.modules()
        if isinstance(module, nn.Sequential) and _swappable_positions(list(module))
    ]
    try:
        for container in containers:
            container.forward = _swapped_forward(container)  # type: ignore[method-assign]
        yield
    finally:
        for container in containers:
            del container.forward


def _swappable_positions(children: list[nn.Module]) -> set[int]:
    return {
        index
        for index, (relu, pool) in enumerate(zip(children, children[1:], strict=False))
        if type(relu) is nn.ReLU
        and type(pool) in _MAX_POOLS
        and not pool.return_indices
        and not any(module._forward_hooks or module._forward_pre_hooks for module in (relu, pool))
    }


def _swapped_forward(container: nn.Sequential):  # noqa: ANN202 - a bound-forward replacement
    children = list(container)
    swapped = _swappable_positions(children)

    def forward(x: Tensor) -> Tensor:
        index = 0
        while index < len(children):
            if index in swapped:
                x = children[index](children[index + 1](x))
                index += 2
            else:
                x = children[index](x)
                index += 1
        return x

    return forward
