"""average_across_processes on two gloo processes: means, None gradients and divergence."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from torch import nn

from lws_lightning.lit.distributed import _buckets, average_across_processes

from .conftest import app_env, free_local_port

# Runs on each rank: parameter "used" gets the gradient rank + 1, "unused" none, "norm" has
# BatchNorm statistics equal to the rank. Then "mismatch" gets a gradient on rank 0 only.
RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from lws_lightning.lit.distributed import average_across_processes

    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    net = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2),
                         "norm": nn.BatchNorm1d(2), "mismatch": nn.Linear(2, 1)})
    for parameter in net["used"].parameters():
        parameter.grad = torch.full_like(parameter, rank + 1.0)
    net["norm"].running_mean.fill_(float(rank))
    net["norm"].running_var.fill_(2.0 * rank)
    net["norm"].num_batches_tracked.fill_(7)
    # bucket_elements=3 spreads the tensors over several all-reduces.
    net["mismatch"].requires_grad_(False)
    average_across_processes(net, bucket_elements=3)
    result = {
        "used": [p.grad.tolist() for p in net["used"].parameters()],
        "unused": [p.grad is None for p in net["unused"].parameters()],
        "running_mean": net["norm"].running_mean.tolist(),
        "running_var": net["norm"].running_var.tolist(),
        "num_batches_tracked": int(net["norm"].num_batches_tracked),
    }
    net["mismatch"].requires_grad_(True)
    if rank == 0:
        net["mismatch"].weight.grad = torch.ones_like(net["mismatch"].weight)
    try:
        average_across_processes(net)
        result["mismatch_error"] = None
    except RuntimeError as error:
        result["mismatch_error"] = str(error)
    dist.destroy_process_group()
    with open(out, "w") as file:
        json.dump(result, file)
    """
)


def test_average_across_two_processes(tmp_path):
    port = str(free_local_port())
    outputs = [tmp_path / f"rank{rank}.json" for rank in (0, 1)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), port, str(outputs[rank])],
            env=app_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [process.communicate(timeout=120)[0] for process in processes]
    for rank, process in enumerate(processes):
        assert process.returncode == 0, f"rank {rank} failed:\n{logs[rank][-3000:]}"

    results = [json.loads(path.read_text()) for path in outputs]
    for rank, result in enumerate(results):
        weight, bias = result["used"]
        assert weight == [[1.5, 1.5], [1.5, 1.5]], f"rank {rank}"
        assert bias == [1.5, 1.5], f"rank {rank}"
        assert result["unused"] == [True, True], f"rank {rank}: an unused parameter got a grad"
        assert result["running_mean"] == [0.5, 0.5], f"rank {rank}"
        assert result["running_var"] == [1.0, 1.0], f"rank {rank}"
        assert result["num_batches_tracked"] == 7, f"rank {rank}"
        assert result["mismatch_error"] is not None, f"rank {rank} accepted diverged gradients"
        assert "1 of 2 processes" in result["mismatch_error"]


def test_average_without_process_group_unchanged():
    net = nn.Linear(2, 2)
    net.weight.grad = torch.ones_like(net.weight)
    average_across_processes(net)
    assert torch.equal(net.weight.grad, torch.ones_like(net.weight))
    assert net.bias.grad is None


def test_buckets_split_by_size_and_dtype():
    tensors = [
        torch.zeros(2),
        torch.zeros(2),
        torch.zeros(3),
        torch.zeros(1, dtype=torch.float64),
        torch.zeros(5),
    ]
    sizes = [[t.numel() for t in bucket] for bucket in _buckets(tensors, bucket_elements=4)]
    assert sizes == [[2, 2], [3], [1], [5]]
