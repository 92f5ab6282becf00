"""Batch normalization over a stacked batch with separate statistics for each group of rows.

The batched engine stacks the task batches of many (sample, task) pairs into one tensor. In
the literal engine each pair's task batch is normalized with its own batch statistics, so
here every batch-norm module that normalizes with batch statistics is patched to compute them
per group of rows (a ghost batch norm). Running statistics are updated afterwards, in closed
form, exactly as the literal engine's sequence of per-pair updates would leave them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

# Groups of at least this many elements are normalized one native batch-norm call per group,
# smaller ones in a few whole-tensor operations. Whole-tensor operations allocate temporaries
# of the full stacked size, which cost page faults and cache misses once they are large, while
# per-group calls work on cache-sized pieces but cost a dispatch each (about 20 µs on CPU).
PER_GROUP_MIN_ELEMENTS = 2**15


class _GroupBatchNorm(torch.autograd.Function):
    """Batch norm of each of ``num_groups`` equal blocks of rows of ``x`` with its own statistics.

    Returns the output, in ``x``'s shape and strides and not a view (so in-place activations
    after it stay cheap for autograd), and each group's mean and biased variance
    (``[groups, C]``, not differentiable). The backward pass differentiates through the
    statistics as batch norm does, with sums over each group's elements per channel.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        num_groups: int,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        grouped = grouped_view(x, num_groups)
        per_group = num_groups == 1 or x.numel() // num_groups >= PER_GROUP_MIN_ELEMENTS
        if num_groups > 1 and _fits_group_norm_kernel(grouped):
            out, mean, invstd = _forward_by_group_norm(x, grouped, weight, bias, eps)
        elif per_group:
            out, mean, invstd = _forward_per_group(x, num_groups, weight, bias, eps)
        else:
            out, mean, invstd = _forward_whole(x, grouped, num_groups, weight, bias, eps)
        # NOTE: the native kernels return 1 / sqrt(var + eps), so var is recovered with an
        # absolute error of about 1e-7 * (var + eps) in float32, which only channels with var
        # near eps notice.
        var = invstd.pow(-2) - eps
        ctx.num_groups = num_groups
        ctx.eps = eps
        ctx.per_group = per_group
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor, _mean: Tensor, _var: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, mean, invstd, weight = ctx.saved_tensors
        grad = same_layout(grad_out, x)
        needs_grad = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1] and weight is not None,
            ctx.needs_input_grad[2] and ctx.has_bias,
        )
        if ctx.per_group:
            grads = _backward_per_group(grad, x, mean, invstd, weight, ctx.eps, needs_grad)
        else:
            grads = _backward_whole(grad, x, ctx.num_groups, mean, invstd, weight, needs_grad)
        return (*grads, None, None)


def _forward_by_group_norm(
    x: Tensor, grouped: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    groups, channels = grouped.shape[:2]
    out, mean, invstd = torch.native_group_norm(
        grouped, weight, bias, groups, channels, grouped[0, 0].numel(), channels, eps
    )
    return _alias_like(out, x), mean.view(groups, channels), invstd.view(groups, channels)


def _forward_per_group(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    if num_groups == 1:
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        return out, mean.unsqueeze(0), invstd.unsqueeze(0)
    out = torch.empty_like(x)
    means, invstds = [], []
    for rows, out_rows in zip(x.chunk(num_groups), out.chunk(num_groups), strict=True):
        result, mean, invstd = torch.native_batch_norm(
            rows, weight, bias, None, None, True, 0.0, eps
        )
        out_rows.copy_(result)
        means.append(mean)
        invstds.append(invstd)
    return out, torch.stack(means), torch.stack(invstds)


def _forward_whole(
    x: Tensor,
    grouped: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    # On CPU, var_mean over these strided layouts took about 100 times as long as a sum
    # (PyTorch 2.14, AMD EPYC), so the mean and the centered sum of squares are computed in
    # two passes of sums.
    dims = tuple(range(2, grouped.dim()))
    count = grouped[0, 0].numel()
    mean = grouped.sum(dims, keepdim=True) / count
    var = (grouped - mean).square().sum(dims, keepdim=True) / count
    invstd = torch.rsqrt(var + eps)
    scale = _scale(invstd, weight, grouped)
    shift = -mean * scale if bias is None else _per_channel(bias, grouped) - mean * scale
    out = torch.empty_like(x)
    torch.addcmul(shift, grouped, scale, out=grouped_view(out, num_groups))
    return out, mean.flatten(1), invstd.flatten(1)


def _backward_per_group(
    grad: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    eps: float,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    num_groups = mean.shape[0]
    if num_groups == 1:
        return torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean[0], invstd[0], True, eps, list(needs_grad)
        )
    grad_x = torch.empty_like(x) if needs_grad[0] else None
    grad_weights, grad_biases = [], []
    for group, (grad_rows, rows) in enumerate(
        zip(grad.chunk(num_groups), x.chunk(num_groups), strict=True)
    ):
        grad_rows_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_rows,
            rows,
            weight,
            None,
            None,
            mean[group],
            invstd[group],
            True,
            eps,
            list(needs_grad),
        )
        if grad_x is not None:
            grad_x.chunk(num_groups)[group].copy_(grad_rows_x)
        grad_weights.append(grad_weight)
        grad_biases.append(grad_bias)
    grad_weight = torch.stack(grad_weights).sum(0) if needs_grad[1] else None
    grad_bias = torch.stack(grad_biases).sum(0) if needs_grad[2] else None
    return grad_x, grad_weight, grad_bias


def _backward_whole(
    grad: Tensor,
    x: Tensor,
    num_groups: int,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    grouped = grouped_view(x, num_groups)
    grouped_grad = grouped_view(grad, num_groups)
    mean, invstd = mean.view(_stats_shape(grouped)), invstd.view(_stats_shape(grouped))
    dims = tuple(range(2, grouped.dim()))
    count = grouped[0, 0].numel()
    centered = grouped - mean
    grad_sum = grouped_grad.sum(dims, keepdim=True)
    # Σ grad · x̂ per group and channel, where x̂ = (x - mean) · invstd.
    grad_dot_xhat = (centered * grouped_grad).sum(dims, keepdim=True) * invstd

    grad_x = None
    if needs_grad[0]:
        scale = _scale(invstd, weight, grouped)
        # grad_x = scale · (grad - mean_g(grad) - x̂ · mean_g(grad · x̂)), in two passes.
        centered_coef = -scale * invstd * grad_dot_xhat / count
        grad_x = torch.empty_like(x)
        grouped_grad_x = grouped_view(grad_x, num_groups)
        torch.addcmul(-scale * grad_sum / count, centered, centered_coef, out=grouped_grad_x)
        grouped_grad_x.addcmul_(grouped_grad, scale)
    grad_weight = grad_dot_xhat.sum(0).flatten() if needs_grad[1] else None
    grad_bias = grad_sum.sum(0).flatten() if needs_grad[2] else None
    return grad_x, grad_weight, grad_bias


def _stats_shape(grouped: Tensor) -> tuple[int, ...]:
    return (*grouped.shape[:2], *([1] * (grouped.dim() - 2)))


def _per_channel(values: Tensor, like: Tensor) -> Tensor:
    """View ``values`` ([C]) to broadcast over dim 1 of ``like``."""
    return values.view(1, -1, *([1] * (like.dim() - 2)))


def _scale(invstd: Tensor, weight: Tensor | None, like: Tensor) -> Tensor:
    return invstd if weight is None else invstd * _per_channel(weight, like)


def _fits_group_norm_kernel(grouped: Tensor) -> bool:
    """Return whether group norm's fast CPU kernel applies to ``grouped``.

    Group norm with one channel per group computes per-(group, channel) batch-norm
    statistics. Its CPU kernel is fast for channels-last-3d tensors, which the grouped view of
    a channels-last 4-D batch is, but copies other layouts first, and takes a slow path when
    size-1 dims make the layout ambiguous.
    """
    return (
        grouped.dim() == 5
        and min(grouped.shape[2:]) > 1
        and grouped.is_contiguous(memory_format=torch.channels_last_3d)
    )


def _alias_like(grouped_out: Tensor, x: Tensor) -> Tensor:
    """Return a tensor of ``x``'s shape on ``grouped_out``'s memory that is not an autograd view.

    ``grouped_out`` must have the layout that :func:`grouped_view` gives ``x``.
    """
    layout = _ungrouped_view(grouped_out, x)
    alias = torch.empty(0, dtype=x.dtype, device=x.device)
    return alias.set_(
        grouped_out.untyped_storage(), layout.storage_offset(), layout.shape, layout.stride()
    )


def same_layout(grad: Tensor, x: Tensor) -> Tensor:
    """Return ``grad`` in ``x``'s memory format, so that both take the same grouped view."""
    if is_channels_last(x):
        return grad if is_channels_last(grad) else to_channels_last(grad)
    return grad.contiguous()


def grouped_view(x: Tensor, num_groups: int) -> Tensor:
    """View ``x`` ([N, C, *spatial], contiguous or channels-last) as ``[groups, C, *elements]``.

    Group g contains rows ``g * N / groups`` up to the next group. For a channels-last 4-D batch
    the view is a channels-last-3d ``[groups, C, rows per group, H, W]`` tensor.
    """
    rows, channels = x.shape[0], x.shape[1]
    per_group = rows // num_groups
    if is_channels_last(x):
        moved = x.movedim(1, -1)
        return moved.view(num_groups, per_group, *moved.shape[1:]).movedim(-1, 1)
    return x.view(num_groups, per_group, channels, -1).transpose(1, 2)


def _ungrouped_view(grouped: Tensor, x: Tensor) -> Tensor:
    """Invert :func:`grouped_view`: view ``grouped`` in ``x``'s shape."""
    if is_channels_last(x):
        moved_shape = (x.shape[0], *x.shape[2:], x.shape[1])
        return grouped.movedim(1, -1).reshape(moved_shape).movedim(-1, 1)
    return grouped.transpose(1, 2).reshape(x.shape)


def is_channels_last(x: Tensor) -> bool:
    """Return whether ``x`` is a 4-D or 5-D tensor stored channels-last, with unit channel stride.

    One-channel tensors count as contiguous in both formats, and only the channel stride
    distinguishes them.
    """
    if x.dim() not in (4, 5) or x.stride(1) != 1:
        return False
    memory_format = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.is_contiguous(memory_format=memory_format)


def to_channels_last(x: Tensor) -> Tensor:
    """Copy a 4-D or 5-D tensor into channels-last strides, explicitly so for one channel.

    ``Tensor.contiguous(memory_format=torch.channels_last)`` keeps the default strides of a
    one-channel tensor, and a convolution given them returns its output in the default format.
    """
    channels = x.shape[1]
    spatial_strides = []
    stride = channels
    for size in reversed(x.shape[2:]):
        spatial_strides.insert(0, stride)
        stride *= size
    strides = (stride, 1, *spatial_strides)
    out = torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device)
    return out.copy_(x)


def normalize_groups(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-normalize each of ``num_groups`` equal blocks of rows of ``x`` with its own statistics.

    Returns the output, and each group's batch mean and unbiased batch variance
    (``[groups, C]``, detached), the values a batch-norm module's running statistics take in.
    """
    rows, channels = x.shape[0], x.shape[1]
    if rows % num_groups:
        raise ValueError(
            f"A batch-norm input has {rows} rows, which do not split into {num_groups} equal "
            "groups; a module of the net changed the batch size."
        )
    count = x.numel() // (num_groups * channels)
    if count < 2:
        raise ValueError(
            f"Batch norm in training mode needs more than 1 value per channel and group, got "
            f"{count}; use a larger task batch."
        )
    if not is_channels_last(x):
        x = x.contiguous()
    out, mean, var = _GroupBatchNorm.apply(x, weight, bias, num_groups, eps)
    return out, mean, var * (count / (count - 1))


@dataclass
class _StatsLog:
    """Batch statistics that one batch-norm module computed during a pass."""

    means: list[Tensor] = field(default_factory=list)
    variances: list[Tensor] = field(default_factory=list)
    # (pair order, call count of this module for the pair so far, group row in the stack)
    events: list[tuple[int, int, int]] = field(default_factory=list)
    calls_per_pair: dict[int, int] = field(default_factory=dict)
    num_groups: int = 0


class GroupedBatchNorm:
    """Run a net's batch-norm modules per group of rows; record their running-statistics updates.

    Inside :meth:`patch`, each ``_BatchNorm`` module that normalizes with batch statistics (in
    training mode, or without running statistics) normalizes every group of rows of its input
    with that group's own statistics. While :attr:`active` (some module is patched), set
    :attr:`groups` before each module call: one entry per group, in row order, listing the
    (sample, task) pairs whose forward pass the group stands for, by their position in the
    literal engine's order (sample-major, then task).

    Modules that track running statistics in training mode do not update them during the
    pass. :meth:`update_running_stats` applies the updates afterwards, as if each listed pair
    had run its own forward pass in literal order.
    """

    def __init__(self) -> None:
        self.groups: Sequence[Sequence[int]] = ()
        self.active = False
        self._logs: dict[_BatchNorm, _StatsLog] = {}

    @contextmanager
    def patch(self, net: nn.Module) -> Iterator[None]:
        """Patch the batch-norm modules of ``net`` that use batch statistics, for one pass."""
        patched = [module for module in net.modules() if uses_batch_stats(module)]
        _reject_unsupported(net)
        try:
            for module in patched:
                module.forward = self._forward_function(module)  # type: ignore[method-assign]
            self.active = bool(patched)
            yield
        finally:
            self.active = False
            for module in patched:
                del module.forward

    def _forward_function(self, module: _BatchNorm) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            module._check_input_dim(x)
            out, mean, var = normalize_groups(
                x, len(self.groups), module.weight, module.bias, module.eps
            )
            if module.training and module.track_running_stats:
                self.record(module, mean, var)
            return out

        return forward

    def record(self, module: _BatchNorm, mean: Tensor, var: Tensor) -> None:
        """Log the batch statistics ([groups, C], unbiased variance) of one call of ``module``."""
        log = self._logs.setdefault(module, _StatsLog())
        for group, pairs in enumerate(self.groups):
            for pair in pairs:
                call = log.calls_per_pair.get(pair, 0)
                log.calls_per_pair[pair] = call + 1
                log.events.append((pair, call, log.num_groups + group))
        log.means.append(mean)
        log.variances.append(var)
        log.num_groups += len(self.groups)

    @torch.no_grad()
    def update_running_stats(self) -> None:
        """Apply the recorded updates to the running statistics, then clear the record.

        The literal engine updates a module's running statistics once per pair and call,
        ``r ← (1 - m_j) r + m_j s_j``, in literal order. After n updates,
        ``r = Π_j (1 - m_j) r_0 + Σ_j m_j Π_{i>j} (1 - m_i) s_j``. Here ``s_j`` is the
        statistic of the group that stood for update j, so duplicate pairs whose activations
        were computed once contribute once per pair. ``m_j`` is the momentum, or
        ``1 / num_batches_tracked`` when the momentum is None (cumulative average).
        """
        for module, log in self._logs.items():
            _apply_updates(module, log)
        self._logs.clear()


def _apply_updates(module: _BatchNorm, log: _StatsLog) -> None:
    events = sorted(log.events)
    count = len(events)
    if count == 0:
        return
    device = module.running_mean.device
    if module.momentum is None:
        tracked = 0 if module.num_batches_tracked is None else int(module.num_batches_tracked)
        factors = 1.0 / torch.arange(tracked + 1, tracked + count + 1, dtype=torch.float64)
    else:
        factors = torch.full((count,), float(module.momentum), dtype=torch.float64)
    # kept_from[j] = Π_{i>=j} (1 - m_i): the share of the value before update j that survives.
    kept_from = torch.flip(torch.cumprod(torch.flip(1.0 - factors, (0,)), 0), (0,))
    event_weights = factors * torch.cat([kept_from[1:], torch.ones(1, dtype=torch.float64)])
    initial_weight = float(kept_from[0])

    group_rows = torch.tensor([group for _, _, group in events])
    group_weights = torch.zeros(log.num_groups, dtype=torch.float64)
    group_weights.index_add_(0, group_rows, event_weights)
    group_weights = group_weights.to(device)

    for buffer, stats in (
        (module.running_mean, log.means),
        (module.running_var, log.variances),
    ):
        stacked = torch.cat(stats).to(torch.float64)
        updated = initial_weight * buffer.to(torch.float64) + group_weights @ stacked
        buffer.copy_(updated)
    if module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(count)


def uses_batch_stats(module: nn.Module) -> bool:
    """Return whether ``module`` is a batch norm that normalizes with its input's statistics."""
    if not isinstance(module, _BatchNorm):
        return False
    return module.training or module.running_mean is None


def _reject_unsupported(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, nn.SyncBatchNorm) and module.training:
            raise NotImplementedError(
                "The batched engine cannot train SyncBatchNorm, whose statistics span "
                "processes; use model.engine=literal or nn.BatchNorm layers."
            )
        if isinstance(module, _InstanceNorm) and module.training and module.track_running_stats:
            raise NotImplementedError(
                "The batched engine cannot update the running statistics of instance norm "
                "layers; use model.engine=literal or track_running_stats=False."
            )
