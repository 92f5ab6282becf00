"""Two DDP processes on the CPU (gloo): every rank ends with the same π, weights and Adam state."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import TINY, app_env, free_local_port, run_app

STEPS = 10


def _assert_equal_tree(left, right, where: str) -> None:
    """Assert that two nested dicts/lists of tensors and numbers are exactly equal."""
    if isinstance(left, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            _assert_equal_tree(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, list | tuple):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            _assert_equal_tree(a, b, f"{where}[{index}]")
    elif isinstance(left, torch.Tensor):
        assert torch.equal(left, right), f"{where} differs between the ranks"
    else:
        assert left == right, f"{where} differs between the ranks: {left!r} != {right!r}"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_root):
    """Train 10 iterations with trainer=ddp_cpu; return the run folder, states and output."""
    root = tmp_path_factory.mktemp("ddp")
    ranks_dir = root / "ranks"
    result = run_app(
        "trainer=ddp_cpu",
        *TINY,
        f"data.root={data_root}",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "+callbacks.rank_state._target_=scale_callbacks.RankStateRecorder",
        f"+callbacks.rank_state.out_dir={ranks_dir}",
        cwd=root,
        env=app_env(MASTER_PORT=str(free_local_port())),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    states = [torch.load(ranks_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    (run_dir,) = (root / "outputs" / "mnist_trio_convnet" / "runs").iterdir()
    return run_dir, states, output


def test_ddp_pi_identical_every_step(ddp_run):
    _, (rank0, rank1), _ = ddp_run
    assert len(rank0["probs"]) == STEPS
    assert len(rank1["probs"]) == STEPS
    for step, (probs0, probs1) in enumerate(zip(rank0["probs"], rank1["probs"], strict=True)):
        assert torch.equal(probs0, probs1), f"π differs between the ranks after step {step}"
    uniform = rank0["probs"][0].new_full(rank0["probs"][0].shape, 1 / 3)
    assert not torch.equal(rank0["probs"][-1], uniform), "NES never moved π"


def test_ddp_ranks_read_different_shards(ddp_run):
    _, (rank0, rank1), _ = ddp_run
    assert rank0["batch_sums"] != rank1["batch_sums"]


def test_ddp_weights_identical(ddp_run):
    _, (rank0, rank1), _ = ddp_run
    assert rank0["global_step"] == STEPS
    assert rank1["global_step"] == STEPS
    _assert_equal_tree(rank0["state_dict"], rank1["state_dict"], "state_dict")


def test_ddp_optimizer_state_identical(ddp_run):
    _, (rank0, rank1), _ = ddp_run
    assert rank0["optimizer"]["state"], "Adam has no state after training"
    _assert_equal_tree(rank0["optimizer"], rank1["optimizer"], "optimizer")
    assert torch.equal(rank0["generator"], rank1["generator"])


def test_ddp_results_written_once(ddp_run):
    run_dir, (rank0, _), output = ddp_run
    assert output.count("Wrote ") == 1
    assert [path.name for path in run_dir.rglob("results.json")] == ["results.json"]
    assert len(list(run_dir.rglob("last.ckpt"))) == 1
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == STEPS
    assert torch.tensor(results["probs"]).shape[0] == rank0["probs"][-1].shape[0]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "ok"
    assert "trainer=ddp_cpu" in status["overrides"]
