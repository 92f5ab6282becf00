"""Training-mode batch norm followed by max-pooling, run with the pooling first.

In training mode, batch norm maps each channel of a group of rows by ``a * x + b``, with
``a = gamma / sqrt(var + eps)`` and ``b = beta - a * mean`` from that group's statistics.
Where ``a > 0``, which holds when every ``gamma`` is positive, the map is increasing, so
max-pooling picks the same elements before and after it, and ``pool(a * x + b)`` equals
``a * pool(x) + b``. Pooling first then saves batch norm's normalization pass over the full
map. The backward pass is batch norm's, written for a gradient that is non-zero only at the
pooled elements:

    dx = a * scatter(g) - (a / M) * (sum(g) + x_hat * sum(g * x_hat_pooled))

where ``g`` is the gradient of the pooled output, ``scatter`` routes it to the selected
elements, the sums run over the group's pooled elements per channel, ``M`` is the group's
element count per channel and ``x_hat = (x - mean) / sqrt(var + eps)``. So the backward pass
makes one dense pass over ``x`` instead of batch norm's two over ``x`` and its gradient.

On two AMD EPYC cores (PyTorch 2.14), this made the SGD pass of the SLO ConvNet on 105×105
images about 5% faster, as the median of 14 paired runs, with groups of [16, 53, 52, 52].
It applies on CPU only, where it was measured.

Ties: where ``a * x + b`` rounds two different elements of a window to the same value, the
literal order (normalize, then pool) selects the first of them, and this order selects the
larger. Both give the same output, and the gradient goes to a different element of the
window. This needs two elements closer than the rounding error of ``b`` and does not occur
in the tests' float64 comparisons. Equal elements stay equal, so exact ties (for example in
binary images) are broken the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from lws_lightning.engine._group_norm import grouped_view, same_layout

_aten = torch.ops.aten
# Pool first only where each group has at least this many elements (4 MiB in float32). On
# groups that fit in the caches, the extra small operations cost more than the passes saved.
# With 2**18, the SGD passes of the DKL and routing ConvNets (first-block groups of
# [16, 32, 28, 28] and [16, 32, 32, 32]) took about 2% and 3% longer on two AMD EPYC cores.
POOLED_MIN_ELEMENTS = 2**20


def pooling_applies(module: _BatchNorm, pool: nn.Module, x: Tensor, num_groups: int) -> bool:
    """Return whether ``pool(module(x))`` can run as :func:`pooled_batch_norm` on ``x``.

    The input must be a 4-D float32 or float64 CPU tensor outside autocast, with at least
    ``POOLED_MIN_ELEMENTS`` elements and 2 values per channel in each group. The pooling must
    be 2-D max-pooling with non-overlapping windows: stride equal to the kernel size, no
    padding or dilation. The batch norm's scale must be positive in every channel.
    """
    if type(pool) is not nn.MaxPool2d or pool.ceil_mode or pool.return_indices:
        return False
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    if kernel != stride or _pair(pool.padding) != (0, 0) or _pair(pool.dilation) != (1, 1):
        return False
    if x.dim() != 4 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if x.numel() < num_groups * max(POOLED_MIN_ELEMENTS, 2 * x.shape[1]):
        return False
    return module.weight is None or bool((module.weight > 0).all())


def pooled_batch_norm(
    module: _BatchNorm, pool: nn.MaxPool2d, x: Tensor, num_groups: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``pool(module(x))`` with each group's batch statistics, pooling first.

    Returns the pooled output and each group's mean and unbiased variance (``[groups, C]``)
    for the running-statistics update. Call it only where :func:`pooling_applies`.
    """
    out, mean, var = _PooledBatchNorm.apply(
        x, module.weight, module.bias, num_groups, module.eps, _pair(pool.kernel_size)
    )
    count = x.numel() // (num_groups * x.shape[1])
    return out, mean, var * (count / (count - 1))


class _PooledBatchNorm(torch.autograd.Function):
    """Batch norm of each group of rows followed by max-pooling, with the pooling first."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        num_groups: int,
        eps: float,
        kernel: tuple[int, int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        means, variances = [], []
        for rows in x.chunk(num_groups):
            # Biased variance, from the native batch-norm statistics kernel.
            mean, var = torch.batch_norm_update_stats(rows, None, None, 0.0)
            means.append(mean)
            variances.append(var)
        mean, var = torch.stack(means), torch.stack(variances)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        pooled, indices = _aten.max_pool2d_with_indices(x, list(kernel), list(kernel))
        out = torch.empty_like(pooled)
        grouped_pooled = grouped_view(pooled, num_groups)
        torch.addcmul(
            _per_group(shift, grouped_pooled),
            grouped_pooled,
            _per_group(scale, grouped_pooled),
            out=grouped_view(out, num_groups),
        )
        ctx.save_for_backward(x, indices, pooled, mean, invstd, weight)
        ctx.num_groups = num_groups
        ctx.kernel = kernel
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out: Tensor, _mean: Tensor, _var: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, indices, pooled, mean, invstd, weight = ctx.saved_tensors
        num_groups, kernel = ctx.num_groups, list(ctx.kernel)
        grad = same_layout(grad_out, pooled)
        grouped_grad = grouped_view(grad, num_groups)
        dims = tuple(range(2, grouped_grad.dim()))
        count = x.numel() // (num_groups * x.shape[1])
        grad_sum = grouped_grad.sum(dims)
        pooled_hat = grouped_view(pooled, num_groups) - _per_group(mean, grouped_grad)
        grad_dot_hat = (grouped_grad * pooled_hat).sum(dims) * invstd

        grad_x = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else invstd * weight
            centered_coef = -scale * invstd * grad_dot_hat / count
            offset = -scale * grad_sum / count - centered_coef * mean
            routed = torch.empty_like(grad)
            grouped_routed = grouped_view(routed, num_groups)
            torch.mul(grouped_grad, _per_group(scale, grouped_grad), out=grouped_routed)
            grad_x = _aten.max_pool2d_with_indices_backward(
                routed, x, kernel, kernel, [0, 0], [1, 1], False, indices
            )
            grad_x = same_layout(grad_x, x)
            grouped_x = grouped_view(x, num_groups)
            grouped_grad_x = grouped_view(grad_x, num_groups)
            grouped_grad_x.addcmul_(grouped_x, _per_group(centered_coef, grouped_x))
            grouped_grad_x.add_(_per_group(offset, grouped_x))
        grad_weight = grad_dot_hat.sum(0) if ctx.needs_input_grad[1] else None
        grad_bias = grad_sum.sum(0) if ctx.needs_input_grad[2] and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None


def _per_group(values: Tensor, grouped: Tensor) -> Tensor:
    """View ``[groups, C]`` statistics to broadcast over ``grouped`` (from ``grouped_view``)."""
    return values.view(*values.shape, *([1] * (grouped.dim() - 2)))


def _pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return (value, value) if isinstance(value, int) else tuple(value)
