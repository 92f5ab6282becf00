"""Prepare convolution and linear weights once per batched pass, not once per call.

A batched pass calls a bank or shared layer once per block of groups, so one module may run
several times per pass. Three preparations of its weights pay:

- Channels-last weights for 2-D convolutions with channels-last input. Given a weight in the
  default format, the CPU convolution converts it on every call, forward and backward. With
  512 channels on 4×4 maps that made a call about 1.4 times slower (PyTorch 2.14, two AMD
  EPYC cores).
- Folding eval-mode batch norm into the layer before it, in passes without gradients. In eval
  mode a batch-norm module with running statistics is a per-channel affine map, so the layer
  before it absorbs it: ``w' = w * s`` and ``b' = (b - mean) * s + beta`` per output channel,
  with ``s = gamma / sqrt(running_var + eps)``. That skips one memory-bound pass over the
  activations.
- Folding training-mode batch norm into a convolution with few inputs per output value, such
  as the first convolution of a net on grayscale images (9 inputs per value for 3×3
  kernels). Its output's batch statistics are those of a linear map of the input patches:
  with patch mean ``mu`` and covariance ``S`` of a group, output channel ``c`` has mean
  ``w_c · mu (+ b_c)`` and variance ``w_c^T S w_c``. Computing ``mu`` and ``S`` costs a
  fraction of the convolution, so the statistics no longer need a pass over the output, and
  the normalization runs inside the convolution as ``w' = w * s`` per group and channel.
  Autograd differentiates through ``mu``, ``S`` and ``s``, which gives batch norm's gradient
  with the statistics' dependence on the weights and the input.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from lws_lightning.engine._group_norm import (
    GroupedBatchNorm,
    is_channels_last,
    to_channels_last,
    uses_batch_stats,
)
from lws_lightning.engine._routing import concat_rows

_FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Fold training-mode batch norm through patch moments where a convolution has at most this many
# inputs per output value (C_in × kernel size) per output channel. The moments cost about that
# ratio of the convolution's multiply-adds.
PATCH_MOMENTS_MAX_RATIO = 0.5
# ... and where each group's output has at least this many elements. The moments take a dozen
# small operations per group, which cost more than they save on small maps. On two AMD EPYC
# cores, an iteration of the DKL ConvNet (400k elements per group after the first convolution)
# took 14% longer with them. One of the SLO ConvNet on 105×105 images (9.3M) took 13% less
# with freed memory kept (lws_lightning.allocator), and 25% less with glibc's defaults.
PATCH_MOMENTS_MIN_ELEMENTS = 2**21


@contextmanager
def prepared_layers(
    net: nn.Module,
    fold: bool,
    norm: GroupedBatchNorm | None = None,
    moments: PatchMoments | None = None,
) -> Iterator[None]:
    """Patch the layers of ``net`` to prepare their weights once inside the context.

    Every ``nn.Conv2d`` reuses one channels-last copy of its weight for channels-last inputs.
    Folding applies to (layer, batch norm) pairs where an ``nn.Sequential`` runs the layer
    directly before the batch-norm module, over the same channels, neither module appears
    anywhere else in ``net`` and neither has hooks. A folded pair runs as the layer alone, and
    the batch norm returns its input.

    - With ``fold``, which needs gradients off, eval-mode batch norm with running statistics
      folds into the convolution or linear layer before it.
    - With ``norm`` active (inside :meth:`GroupedBatchNorm.patch`), batch norm that normalizes
      with batch statistics folds into an ``nn.Conv2d`` with few inputs per output value, with
      each group's statistics from its patch moments. The statistics go to ``norm`` for the
      running-statistics update. Calls under autocast or in low precision run unfolded.
      ``moments`` computes the patch moments of each distinct input group once. Pass one
      instance to several contexts of a pass to share it, or None for one per context.

    Prepared weights depend on the parameters at first use, so leave the context before an
    optimizer step changes them. Enter it inside ``norm.patch``, whose batch-norm forward it
    calls for unfolded calls.
    """
    if fold and torch.is_grad_enabled():
        raise RuntimeError(
            "prepared_layers(fold=True) needs gradients off: folded batch norm has no gradient "
            "for its weights. Call it under torch.no_grad()."
        )
    grouped = norm if norm is not None and norm.active else None
    moments = moments if moments is not None else PatchMoments()
    states = {
        layer: _FoldState(batch_norm, grouped, moments)
        for layer, batch_norm in _foldable_pairs(net, fold, grouped is not None)
    }
    # Exact types only: a subclass may compute its weight differently in its own forward.
    layers = {module for module in net.modules() if type(module) is nn.Conv2d}
    layers.update(states)
    try:
        for layer in layers:
            layer.forward = _prepared_forward(layer, states.get(layer))  # type: ignore[method-assign]
        for state in states.values():
            state.install()
        yield
    finally:
        for layer in layers:
            del layer.forward
        for state in states.values():
            state.uninstall()


def folded_norm(module: nn.Module) -> bool:
    """Return whether ``module`` is a batch norm that the last call of its layer folded.

    Inside :func:`prepared_layers`, such a module returns its input unchanged.
    """
    state = getattr(vars(module).get("forward"), "__self__", None)
    return isinstance(state, _FoldState) and state.folded


def _foldable_pairs(
    net: nn.Module, eval_fold: bool, batch_fold: bool
) -> list[tuple[nn.Module, _BatchNorm]]:
    uses = Counter(id(module) for _, module in net.named_modules(remove_duplicate=False))
    pairs = []
    for container in net.modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container)
        for layer, norm in zip(children, children[1:], strict=False):
            if uses[id(layer)] != 1 or uses[id(norm)] != 1 or not _plain_pair(layer, norm):
                continue
            if (eval_fold and _can_fold_eval(norm)) or (
                batch_fold and _can_fold_batch(layer, norm)
            ):
                pairs.append((layer, norm))
    return pairs


def _plain_pair(layer: nn.Module, norm: nn.Module) -> bool:
    """Return whether ``norm`` is a hook-free batch norm over ``layer``'s output channels."""
    if type(layer) not in _FOLDABLE_LAYERS or not isinstance(norm, _BatchNorm):
        return False
    channels = layer.out_channels if isinstance(layer, _ConvNd) else layer.out_features
    if channels != norm.num_features:
        return False
    return not any(module._forward_hooks or module._forward_pre_hooks for module in (layer, norm))


def _can_fold_eval(norm: _BatchNorm) -> bool:
    return not norm.training and norm.running_mean is not None and norm.running_var is not None


def _can_fold_batch(layer: nn.Module, norm: _BatchNorm) -> bool:
    return (
        type(layer) is nn.Conv2d
        and uses_batch_stats(norm)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


class _FoldState:
    """A folded pair's batch norm, and whether the last call of its layer folded it."""

    def __init__(
        self, norm: _BatchNorm, grouped: GroupedBatchNorm | None, moments: PatchMoments
    ) -> None:
        self.norm = norm
        self.grouped = grouped
        self.batch_stats = uses_batch_stats(norm)
        self.folded = False
        self.moments = moments
        # The forward that unfolded calls run: GroupedBatchNorm's patch, if present.
        self._previous = vars(norm).get("forward")

    def install(self) -> None:
        self.norm.forward = self.norm_forward  # type: ignore[method-assign]

    def uninstall(self) -> None:
        if self._previous is None:
            del self.norm.forward
        else:
            self.norm.forward = self._previous  # type: ignore[method-assign]

    def norm_forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return x
        if self._previous is not None:
            return self._previous(x)
        return type(self.norm).forward(self.norm, x)


def _prepared_forward(layer: nn.Module, state: _FoldState | None) -> Callable[[Tensor], Tensor]:
    cache: dict[tuple[bool, bool], tuple[Tensor, Tensor | None]] = {}

    def weights(channels_last: bool, fold: bool) -> tuple[Tensor, Tensor | None]:
        if (channels_last, fold) not in cache:
            weight, bias = layer.weight, layer.bias
            if fold:
                weight, bias = _fold(weight, bias, state.norm)
            if channels_last:
                weight = weight.contiguous(memory_format=torch.channels_last)
            cache[channels_last, fold] = (weight, bias)
        return cache[channels_last, fold]

    def forward(x: Tensor) -> Tensor:
        if state is not None and state.batch_stats:
            state.folded = _moments_pay(layer, x, state)
            if state.folded:
                return _batch_folded_conv(layer, x, state.norm, state.grouped, state.moments)
            fold = False
        else:
            fold = state is not None and _folding_pays(layer, x)
            if state is not None:
                state.folded = fold
        if isinstance(layer, nn.Linear):
            return F.linear(x, *weights(False, fold))
        channels_last = isinstance(layer, nn.Conv2d) and is_channels_last(x)
        return layer._conv_forward(x, *weights(channels_last, fold))

    return forward


def _folding_pays(layer: nn.Module, x: Tensor) -> bool:
    """Return whether folding the batch norm into this call of ``layer`` saves work.

    Folding replaces a pass over the call's output with a rescaled copy of the weight, which
    pays once the output has at least twice as many elements as the weight. Where it has
    fewer, as for 512-channel 3×3 convolutions on 4×4 maps, the batch norm runs as usual.
    """
    output_elements = x.numel() // x.shape[1] * layer.weight.shape[0]
    return output_elements >= 2 * layer.weight.numel()


def _moments_pay(layer: nn.Conv2d, x: Tensor, state: _FoldState) -> bool:
    """Return whether this call folds batch norm with statistics from patch moments.

    It pays where the convolution has few inputs per output value. It runs only where the
    call's groups are known, in single or double precision outside autocast, and where every
    group has at least 2 values per channel (otherwise batch norm's own error applies).
    """
    grouped = state.grouped
    if grouped is None or not grouped.groups or x.dim() != 4:
        return False
    if x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(x.device.type):
        return False
    inputs_per_value = layer.weight[0].numel()
    if inputs_per_value > PATCH_MOMENTS_MAX_RATIO * layer.out_channels:
        return False
    num_groups = len(grouped.groups)
    if x.shape[0] % num_groups:
        return False
    height, width = _output_size(layer, x)
    positions = x.shape[0] // num_groups * height * width
    return positions >= 2 and positions * layer.out_channels >= PATCH_MOMENTS_MIN_ELEMENTS


def _output_size(layer: nn.Conv2d, x: Tensor) -> tuple[int, int]:
    sizes = []
    for size, kernel, stride, padding, dilation in zip(
        x.shape[2:], layer.kernel_size, layer.stride, layer.padding, layer.dilation, strict=True
    ):
        sizes.append((size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1)
    return sizes[0], sizes[1]


class PatchMoments:
    """Patch mean and covariance of groups of input rows, computed once per distinct group.

    In a batched pass, a first layer receives each task's batch once for every bank that the
    task's pairs picked. The moments depend on the input and the kernel's geometry (size,
    dilation, padding, stride) alone, so one instance serves every bank. Groups are matched by
    exact equality of their rows, with the sum of each group as a first check. Only inputs
    without gradients on the CPU are matched: there the check costs a small fraction of the
    moments, while on a GPU reading the sums would wait for the device.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[object, ...], list[tuple[Tensor, Tensor, Tensor]]] = {}
        self.computed_groups = 0

    def __call__(
        self, layer: nn.Conv2d, x: Tensor, num_groups: int, stats_dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Return the patch mean [groups, D] and covariance [groups, D, D] of ``x``'s groups."""
        if x.requires_grad or x.device.type != "cpu":
            self.computed_groups += num_groups
            return _patch_moments(layer, x, num_groups, stats_dtype)
        parts = x.unflatten(0, (num_groups, -1))
        sums = parts.sum(dim=tuple(range(1, parts.dim())), dtype=torch.float64).tolist()
        geometry = (layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        keys = [(geometry, tuple(parts.shape[1:]), x.dtype, stats_dtype, s) for s in sums]
        # Per group: its cached moments, the index of an equal group earlier in this call, or
        # None where the moments are computed below.
        sources: list[tuple[Tensor, Tensor] | int | None] = []
        missing: list[int] = []
        for index, (part, key) in enumerate(zip(parts, keys, strict=True)):
            cached = self._entries.get(key, [])
            source: tuple[Tensor, Tensor] | int | None = next(
                ((m, c) for rows, m, c in cached if torch.equal(rows, part)), None
            )
            if source is None:
                source = next(
                    (j for j in missing if keys[j] == key and torch.equal(parts[j], part)), None
                )
            if source is None:
                missing.append(index)
            sources.append(source)

        computed: dict[int, tuple[Tensor, Tensor]] = {}
        if missing:
            new_rows = x if len(missing) == num_groups else parts[missing].flatten(0, 1)
            means, covariances = _patch_moments(layer, new_rows, len(missing), stats_dtype)
            self.computed_groups += len(missing)
            for index, mean, covariance in zip(missing, means, covariances, strict=True):
                self._entries.setdefault(keys[index], []).append((parts[index], mean, covariance))
                computed[index] = (mean, covariance)
        results = []
        for index, source in enumerate(sources):
            if source is None:
                source = computed[index]
            elif isinstance(source, int):
                source = computed[source]
            results.append(source)
        return (
            torch.stack([mean for mean, _ in results]),
            torch.stack([covariance for _, covariance in results]),
        )


def _patch_moments(
    layer: nn.Conv2d, x: Tensor, num_groups: int, stats_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Return the mean [groups, D] and covariance [groups, D, D] of each group's input patches."""
    rows = x.shape[0] // num_groups
    columns = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    positions = rows * columns.shape[2]
    patches = columns.to(stats_dtype).view(num_groups, rows, *columns.shape[1:])
    patch_mean = patches.mean((1, 3))
    centered = (patches - patch_mean[:, None, :, None]).flatten(0, 1)  # [rows, D, L]
    dims = centered.shape[1]
    covariance = (centered @ centered.transpose(1, 2)).view(num_groups, rows, dims, dims)
    return patch_mean, covariance.sum(1) / positions


def _batch_folded_conv(
    layer: nn.Conv2d,
    x: Tensor,
    norm: _BatchNorm,
    grouped: GroupedBatchNorm,
    moments: PatchMoments,
) -> Tensor:
    """Run ``layer`` and training-mode ``norm`` as one convolution per group of rows.

    Each group's output mean and variance come from the mean and covariance of its input
    patches. They are computed in double precision where the device has it, because the
    variance is a quadratic form, which loses digits in single precision when filters and
    patch correlations nearly cancel. The convolution runs on the zero-padded input minus its
    mean per channel, and the bias is corrected to match. Then neither the output nor the
    gradient of the batch-norm scale is a difference of large terms, even when the input's
    mean is large compared with its spread.
    """
    num_groups = len(grouped.groups)
    rows = x.shape[0] // num_groups
    stats_dtype = torch.float32 if x.device.type == "mps" else torch.float64
    patch_mean, covariance = moments(layer, x, num_groups, stats_dtype)
    height, width = _output_size(layer, x)
    positions = rows * height * width
    flat = layer.weight.flatten(1).to(stats_dtype)  # [C, D]
    mean = patch_mean @ flat.T  # [groups, C]
    if layer.bias is not None:
        mean = mean + layer.bias.to(stats_dtype)
    var = ((covariance @ flat.T) * flat.T).sum(1).clamp_min(0.0)
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.to(stats_dtype)
    # With p = (p - center) + center per input channel, s * (w · p + b - mean) + beta equals
    # s * w · (p - center) + beta - s * w · (patch_mean - center), so the conv bias cancels.
    kernel_size = layer.weight[0, 0].numel()
    centers = patch_mean.view(num_groups, layer.in_channels, kernel_size).mean(-1)
    offsets = patch_mean - centers.repeat_interleave(kernel_size, dim=1)
    shift = -scale * (offsets @ flat.T)
    if norm.bias is not None:
        shift = shift + norm.bias.to(stats_dtype)
    if layer.bias is not None:
        # Keep the cancelled bias in the graph, so that it gets its zero gradient (not None),
        # and optimizers treat it as they do after an unfolded pass.
        shift = shift + 0.0 * layer.bias.to(stats_dtype)
    scale, shift, centers = scale.to(x.dtype), shift.to(x.dtype), centers.to(x.dtype)

    channels_last = is_channels_last(x)
    height_padding, width_padding = layer.padding
    outputs = []
    for group, group_rows in enumerate(x.split(rows)):
        padded = F.pad(group_rows, (width_padding, width_padding, height_padding, height_padding))
        shifted = padded - centers[group].view(1, -1, 1, 1)
        weight = layer.weight * scale[group].view(-1, 1, 1, 1)
        if channels_last:
            shifted = to_channels_last(shifted)
            weight = weight.contiguous(memory_format=torch.channels_last)
        outputs.append(
            F.conv2d(shifted, weight, shift[group], layer.stride, 0, layer.dilation, layer.groups)
        )
    if norm.training and norm.track_running_stats:
        unbiased = var * (positions / (positions - 1))
        grouped.record(norm, mean.detach().to(x.dtype), unbiased.detach().to(x.dtype))
    return outputs[0] if num_groups == 1 else concat_rows(outputs)


def _fold(weight: Tensor, bias: Tensor | None, norm: _BatchNorm) -> tuple[Tensor, Tensor]:
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    folded_bias = -norm.running_mean * scale
    if bias is not None:
        folded_bias = folded_bias + bias * scale
    if norm.bias is not None:
        folded_bias = folded_bias + norm.bias
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), folded_bias
