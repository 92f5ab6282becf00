"""Max-pooling before ReLU, and before the batch norm in front of them, with the same results.

ReLU is monotone, so ``max_pool(relu(x)) == relu(max_pool(x))`` for any max-pooling (its
padding is -inf, so every window keeps at least one real element). With pooling first, ReLU
and its backward run on the pooled map, a quarter of the elements for 2×2 pooling, and the
ReLU before pooling no longer makes a pass over the largest activations of a block.
Gradients agree too. Where a window's maximum is positive, both orders route the gradient to
the same first maximal element. Where it is 0 or negative, both orders give the whole window a
zero gradient, because ReLU's gradient at 0 is 0.

A batch norm with batch statistics directly before the pair is an increasing map per channel
where its scale is positive, so it moves after the pooling as well (see
:mod:`lws_lightning.engine._pool_norm`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lws_lightning.engine._group_norm import GroupedBatchNorm, uses_batch_stats
from lws_lightning.engine._layer_weights import folded_norm
from lws_lightning.engine._pool_norm import pooled_batch_norm, pooling_applies

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


@contextmanager
def pool_before_relu(net: nn.Module, norm: GroupedBatchNorm | None = None) -> Iterator[None]:
    """Inside the context, run each ``nn.Sequential``'s ReLU, max-pool pairs as max-pool, ReLU.

    A pair qualifies where an ``nn.ReLU`` runs directly before a max-pooling module that
    returns no indices, and neither has hooks. Where a hook-free batch norm runs directly
    before a pair and normalizes with batch statistics under ``norm`` (active, inside
    :meth:`GroupedBatchNorm.patch`), calls for which :func:`pooling_applies` holds run it
    after the pooling too, and record its statistics in ``norm``.
    """
    containers = [
        module
        for module in net.modules()
        if isinstance(module, nn.Sequential) and _swappable_positions(list(module))
    ]
    try:
        for container in containers:
            container.forward = _swapped_forward(container, norm)  # type: ignore[method-assign]
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
        and not _has_hooks(relu, pool)
    }


def _has_hooks(*modules: nn.Module) -> bool:
    return any(module._forward_hooks or module._forward_pre_hooks for module in modules)


def _swapped_forward(container: nn.Sequential, norm: GroupedBatchNorm | None):  # noqa: ANN202 - a bound-forward replacement
    children = list(container)
    swapped = _swappable_positions(children)
    norms_before = {
        index - 1
        for index in swapped
        if index > 0
        and isinstance(children[index - 1], _BatchNorm)
        and not _has_hooks(children[index - 1])
    }

    def forward(x: Tensor) -> Tensor:
        index = 0
        while index < len(children):
            if index in norms_before:
                pooled = _pooled_norm(children[index], children[index + 2], x, norm)
                if pooled is not None:
                    x = children[index + 1](pooled)
                    index += 3
                    continue
            if index in swapped:
                x = children[index](children[index + 1](x))
                index += 2
            else:
                x = children[index](x)
                index += 1
        return x

    return forward


def _pooled_norm(
    module: _BatchNorm, pool: nn.Module, x: Tensor, norm: GroupedBatchNorm | None
) -> Tensor | None:
    """Return ``pool(module(x))`` with the pooling first, or None where that does not apply."""
    if norm is None or not norm.active or not uses_batch_stats(module) or folded_norm(module):
        return None
    num_groups = len(norm.groups)
    if num_groups == 0 or x.shape[0] % num_groups:
        return None
    if not pooling_applies(module, pool, x, num_groups):
        return None
    module._check_input_dim(x)
    out, mean, var = pooled_batch_norm(module, pool, x, num_groups)
    if module.training and module.track_running_stats:
        norm.record(module, mean, var)
    return out
