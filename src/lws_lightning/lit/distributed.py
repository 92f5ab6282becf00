"""Gradient and BatchNorm-statistics averaging across DDP processes, once per LWS iteration.

One LWS iteration runs λθ backward passes, and in each of them some banks get no gradient.
DDP's reducer would all-reduce every bucket after every backward pass and, unless
``find_unused_parameters`` is on, fail on the banks the pass left out. :class:`LWSModule` keeps
the reducer idle during the iteration (:func:`reducer_paused`) and calls
:func:`average_across_processes` once, after the last backward pass and before the optimizer
step. That costs, per iteration, one all-reduce of the gradients of all weights and one of
the BatchNorm statistics, each split into buckets of at most :data:`BUCKET_ELEMENTS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

# Elements per all-reduce; 2**24 float32 values are 64 MiB, which bounds the extra memory.
BUCKET_ELEMENTS = 2**24


def process_count() -> int:
    """Return the number of processes in the default process group, 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@contextmanager
def reducer_paused(strategy: Strategy) -> Iterator[None]:
    """Keep DDP's gradient reducer from all-reducing inside the block.

    Under DDP this is ``DistributedDataParallel.no_sync`` (Lightning's
    ``ParallelStrategy.block_backward_sync``). Lightning's ``manual_backward`` then skips the
    reducer's ``prepare_for_backward``, so banks without a gradient raise no unused-parameters
    error. Strategies without ``block_backward_sync`` (a single device) run the block unchanged.
    """
    block_backward_sync = getattr(strategy, "block_backward_sync", None)
    if block_backward_sync is None:
        yield
        return
    with block_backward_sync():
        yield


@torch.no_grad()
def average_across_processes(net: nn.Module, bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Replace the gradients and floating-point buffers of ``net`` by their mean over processes.

    A parameter whose gradient is None on every process keeps None, so the optimizer skips it
    as it would in a single process. The floating-point buffers are BatchNorm's running mean
    and variance; their mean over processes is the usual approximation of statistics over
    the union of the shards. Integer buffers such as ``num_batches_tracked`` are left alone,
    since every process trains the same banks. Without a process group this does nothing.

    Raises:
        RuntimeError: Some processes hold a gradient for a parameter and others hold None.
            That means they sampled different assignments, so their sampling generators
            diverged.
    """
    world_size = process_count()
    if world_size == 1:
        return
    parameters = [p for p in net.parameters() if p.requires_grad]
    for bucket in _buckets(parameters, bucket_elements):
        _average_gradients(bucket, world_size)
    buffers = [b for b in net.buffers() if b.is_floating_point()]
    for bucket in _buckets(buffers, bucket_elements):
        _average_tensors(bucket, world_size)


def _buckets(tensors: Iterable[Tensor], bucket_elements: int) -> Iterator[list[Tensor]]:
    """Split ``tensors`` in order into lists of one device and dtype, each of bounded size."""
    bucket: list[Tensor] = []
    size = 0
    for tensor in tensors:
        fits = size + tensor.numel() <= bucket_elements
        same_kind = not bucket or (
            tensor.device == bucket[0].device and tensor.dtype == bucket[0].dtype
        )
        if bucket and not (fits and same_kind):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket


def _average_gradients(parameters: list[Tensor], world_size: int) -> None:
    # Every process sends a value for every parameter (zeros where its gradient is None) and a
    # 0/1 flag per parameter, so the all-reduced tensors have the same size on every process.
    values = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flags = torch.tensor(
        [p.grad is not None for p in parameters],
        dtype=parameters[0].dtype,
        device=parameters[0].device,
    )
    flat = torch.cat([v.reshape(-1) for v in values] + [flags])
    dist.all_reduce(flat)
    sums = flat[: -len(parameters)].split([p.numel() for p in parameters])
    counts = flat[-len(parameters) :].tolist()
    for parameter, total, count in zip(parameters, sums, counts, strict=True):
        if count == 0:
            continue
        if count != world_size:
            raise RuntimeError(
                f"{int(count)} of {world_size} processes have a gradient for a parameter of shape "
                f"{tuple(parameter.shape)}: the processes trained different banks, so their "
                "assignment-sampling generators diverged. Seed the generator identically on "
                "every process."
            )
        parameter.grad.copy_(total.view_as(parameter)).div_(world_size)


def _average_tensors(tensors: list[Tensor], world_size: int) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(world_size)
    for tensor, mean in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(mean.view_as(tensor))
