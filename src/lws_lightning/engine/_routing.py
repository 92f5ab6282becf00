"""Activations of a batched pass as blocks of groups, and the gathering of module inputs.

A group is the task batch of one prefix-tree node, ``batch`` consecutive rows. A block is
one tensor of consecutive groups, the output of one module call. Each module call of a pass
takes a list of groups as its input, which :func:`gather` assembles from the blocks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lws_lightning.engine._group_norm import is_channels_last
from lws_lightning.engine._plan import Pair


@dataclass
class Group:
    """Pairs of one task that share their activations at the current position."""

    task: int
    pairs: list[Pair]


@dataclass
class Block:
    """Activations of consecutive groups, stacked in one tensor in group order."""

    tensor: Tensor
    groups: list[Group]


def gather(blocks: Sequence[Block], requests: Sequence[Sequence[int]], rows: int) -> list[Tensor]:
    """Return, per request, the stacked rows of the groups it lists.

    Groups are numbered across ``blocks`` in order, and each has ``rows`` rows. Every block is
    split once, at the edges of the requested runs of consecutive groups, so that the backward
    pass assembles each block's gradient in one concatenation, not in one full-size scatter
    per request. A request that is one piece of a block, and whose groups no other request
    lists, gets a view of the block. Other requests get a copy, so a module that modifies its
    input in place (a leading in-place ReLU, say) cannot change another request's input.
    """
    locations = [
        (block, index) for block, item in enumerate(blocks) for index in range(len(item.groups))
    ]
    readers = Counter(group for request in requests for group in request)
    cuts = [{0, len(block.groups)} for block in blocks]
    runs_per_request = []
    for request in requests:
        runs: list[list[int]] = []  # [block, first group, end group] in the block's numbering
        for group in request:
            block, index = locations[group]
            if runs and runs[-1][0] == block and runs[-1][2] == index:
                runs[-1][2] = index + 1
            else:
                runs.append([block, index, index + 1])
        for block, start, end in runs:
            cuts[block].update((start, end))
        runs_per_request.append(runs)

    pieces = [
        _split_block(block, sorted(edges), rows) for block, edges in zip(blocks, cuts, strict=True)
    ]
    inputs = []
    for request, runs in zip(requests, runs_per_request, strict=True):
        parts = []
        for block, start, end in runs:
            while start < end:
                start, piece = pieces[block][start]
                parts.append(piece)
        if len(parts) == 1 and all(readers[group] == 1 for group in request):
            inputs.append(parts[0])
        else:
            inputs.append(concat_rows(parts))
    return inputs


def _split_block(block: Block, edges: list[int], rows: int) -> dict[int, tuple[int, Tensor]]:
    """Split a block at the group ``edges``; map each piece's first group to (end, piece)."""
    if len(edges) == 2:
        return {edges[0]: (edges[1], block.tensor)}
    spans = list(zip(edges[:-1], edges[1:], strict=True))
    parts = block.tensor.split([(end - start) * rows for start, end in spans])
    return {start: (end, part) for (start, end), part in zip(spans, parts, strict=True)}


def concat_rows(parts: Sequence[Tensor]) -> Tensor:
    """Concatenate ``parts`` along dim 0 into a new tensor, channels-last if they are."""
    if all(is_channels_last(part) for part in parts):
        return torch.cat([part.movedim(1, -1) for part in parts]).movedim(-1, 1)
    return torch.cat(list(parts))
