"""Check mixed precision and DDP on CUDA GPUs with a few LWS iterations; print what passed.

Run from the repository root on a machine with a CUDA GPU:

    .venv/bin/python benchmarks/gpu_check.py

Checks, each a run of ``python -m lws_lightning`` on synthetic in-memory data (no network, no
dataset files), 30 iterations of a width-8 DKL ConvNet:

1. ``16-mixed`` on one GPU with gradient clipping: the run finishes, the gradient scaler is
   active, and the NES evaluations ran under float16 autocast without gradients.
2. ``bf16-mixed`` on one GPU: the run finishes.
3. DDP with NCCL on 2 GPUs under ``16-mixed`` (only with at least 2 GPUs): π after every
   iteration, the weights, the Adam state and the sampling generator are identical on both
   ranks, and results.json is written once.

Each run has a time limit, so the script ends within about 5 minutes. It exits with 1 if a
check failed and 0 otherwise; skipped checks are listed. ``--cpu`` runs the same checks on the
CPU (bf16-mixed, gloo) to test the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks"
TEST_CALLBACKS = REPO / "tests" / "scale"
# Seconds one run may take; three runs stay under 5 minutes together.
RUN_TIMEOUT_S = 90
STEPS = 30

log = logging.getLogger("gpu_check")


@dataclass
class Outcome:
    """Result of one check: PASS, FAIL or SKIP, and why."""

    name: str
    status: str
    detail: str


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_app(root: Path, *overrides: str) -> tuple[int, str, float]:
    """Run the app with tiny settings under ``root``; return exit code, output and seconds."""
    command = [
        sys.executable,
        "-m",
        "lws_lightning",
        f"hydra.searchpath=[file://{HERE / 'conf'}]",
        "data=synthetic",
        "logger=none",
        f"paths.root_dir={root}",
        "+model.architecture_options.width=8",
        "+model.architecture_options.hidden=16",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "callbacks.progress_bar.refresh_rate=0",
        *overrides,
    ]
    python_path = os.pathsep.join(
        filter(None, [str(HERE), str(TEST_CALLBACKS), os.environ.get("PYTHONPATH")])
    )
    env = {
        **os.environ,
        "PYTHONPATH": python_path,
        "HYDRA_FULL_ERROR": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_local_port()),
    }
    started = time.monotonic()
    try:
        completed = subprocess.run(
            command,
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode(errors="replace") if error.stdout else ""
        return 124, output + f"\ntimed out after {RUN_TIMEOUT_S} s", time.monotonic() - started
    output = completed.stdout + completed.stderr
    (root / "app.log").write_text(output)
    return completed.returncode, output, time.monotonic() - started


def _run_dir(root: Path) -> Path:
    (run_dir,) = (root / "outputs" / "mnist_trio_convnet" / "runs").iterdir()
    return run_dir


def _failure(name: str, code: int, output: str, root: Path) -> Outcome:
    tail = "\n    ".join(output.strip().splitlines()[-15:])
    return Outcome(name, "FAIL", f"exit code {code}; full output in {root / 'app.log'}\n    {tail}")


def check_mixed_precision(workdir: Path, precision: str, accelerator: str) -> Outcome:
    """Train on one device under ``precision``; check the scaler and the NES autocast dtype."""
    name = f"{precision} on one {accelerator.upper()}"
    if accelerator == "cpu" and precision == "16-mixed":
        name += " (Lightning runs it as bf16-mixed)"

    root = workdir / precision
    root.mkdir()
    probe = root / "probe"
    code, output, seconds = _run_app(
        root,
        f"trainer={'gpu' if accelerator == 'gpu' else 'cpu'}",
        f"trainer.precision={precision}",
        "model.grad_clip=1.0",
        "+callbacks.scaler._target_=gpu_check_support.ScalerProbe",
        f"+callbacks.scaler.out_dir={probe}",
        "+callbacks.activations._target_=scale_callbacks.ActivationRecorder",
        f"+callbacks.activations.out_dir={probe}",
    )
    if code != 0:
        return _failure(name, code, output, root)

    results = json.loads((_run_dir(root) / "results.json").read_text())
    scaler = json.loads((probe / "scaler.json").read_text())
    counts = json.loads((probe / "activations.json").read_text())

    # Lightning runs 16-mixed as bf16-mixed on a CPU.
    expected = precision if accelerator == "gpu" else "bf16-mixed"
    dtype = "torch.float16" if expected == "16-mixed" else "torch.bfloat16"
    problems = []
    if scaler["precision"] != expected:
        problems.append(f"trainer.precision is {scaler['precision']}, expected {expected}")
    if expected == "16-mixed" and scaler["scaler"] is None:
        problems.append("no gradient scaler under 16-mixed")
    if counts.get(f"eval/no_grad/{dtype}", 0) == 0:
        problems.append(f"NES evaluations did not run under {dtype} autocast without grad")
    if counts.get(f"train/grad/{dtype}", 0) == 0:
        problems.append(f"SGD passes did not run under {dtype} autocast")
    if not math.isfinite(results["test"]["error"]):
        problems.append(f"test error is {results['test']['error']}")

    if problems:
        return Outcome(name, "FAIL", "; ".join(problems))
    detail = (
        f"{seconds:.0f} s, device {scaler['device']}, test error {results['test']['error']:.3f}, "
        f"final loss scale {scaler['scales'][-1] if scaler['scales'] else 'none'}"
    )
    return Outcome(name, "PASS", detail)


def check_ddp(workdir: Path, accelerator: str, num_devices: int) -> Outcome:
    """Train with DDP on 2 devices; check that both ranks hold identical state."""
    name = f"DDP on 2 {accelerator.upper()} processes"
    if num_devices < 2:
        return Outcome(name, "SKIP", f"needs 2 GPUs, found {num_devices}")

    root = workdir / "ddp"
    root.mkdir()
    ranks = root / "ranks"
    precision = "16-mixed" if accelerator == "gpu" else "bf16-mixed"
    code, output, seconds = _run_app(
        root,
        "trainer=ddp" if accelerator == "gpu" else "trainer=ddp_cpu",
        "trainer.devices=2",
        f"trainer.precision={precision}",
        "+callbacks.ranks._target_=scale_callbacks.RankStateRecorder",
        f"+callbacks.ranks.out_dir={ranks}",
    )
    if code != 0:
        return _failure(name, code, output, root)

    states = [torch.load(ranks / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    batch_sums = [state.pop("batch_sums") for state in states]
    problems = _differences(states[0], states[1], "")
    if batch_sums[0] == batch_sums[1]:
        problems.append("both ranks read the same batches")
    written = len(list(_run_dir(root).rglob("results.json")))
    if written != 1 or output.count("Wrote ") != 1:
        problems.append(f"results.json written {output.count('Wrote ')} times")

    if problems:
        return Outcome(name, "FAIL", "; ".join(problems[:5]))
    return Outcome(
        name, "PASS", f"{seconds:.0f} s, {precision}, ranks identical after {STEPS} steps"
    )


def _differences(left: object, right: object, where: str) -> list[str]:
    """List where two nested structures of tensors and plain values differ."""
    if isinstance(left, dict):
        if left.keys() != right.keys():
            return [f"{where}: different keys"]
        return [d for key in left for d in _differences(left[key], right[key], f"{where}.{key}")]
    if isinstance(left, list | tuple):
        if len(left) != len(right):
            return [f"{where}: different lengths"]
        pairs = zip(left, right, strict=True)
        return [d for i, (a, b) in enumerate(pairs) for d in _differences(a, b, f"{where}[{i}]")]
    if isinstance(left, torch.Tensor):
        if torch.equal(left, right):
            return []
        gap = (left.double() - right.double()).abs().max().item() if left.is_floating_point() else 0
        return [f"{where} differs (max abs difference {gap:.3g})"]
    if left == right:
        return []
    return [f"{where}: {left!r} != {right!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cpu", action="store_true", help="run the checks on the CPU (tests the script itself)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the run folders and print where they are"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    accelerator = "cpu" if args.cpu else "gpu"
    num_devices = 2 if args.cpu else torch.cuda.device_count()
    log.info(
        "torch %s, CUDA %s, %d CUDA devices",
        torch.__version__,
        torch.version.cuda,
        torch.cuda.device_count(),
    )
    if accelerator == "gpu" and num_devices == 0:
        log.info("SKIP all checks: no CUDA device found (use --cpu to test the script)")
        return 0
    for index in range(torch.cuda.device_count()):
        log.info("  cuda:%d %s", index, torch.cuda.get_device_name(index))

    workdir = Path(tempfile.mkdtemp(prefix="lws_gpu_check_"))
    outcomes = [
        check_mixed_precision(workdir, "16-mixed", accelerator),
        check_mixed_precision(workdir, "bf16-mixed", accelerator),
        check_ddp(workdir, accelerator, num_devices),
    ]
    for outcome in outcomes:
        log.info("%s  %s: %s", outcome.status, outcome.name, outcome.detail)
    if args.keep:
        log.info("Run folders are in %s", workdir)
    failed = [outcome for outcome in outcomes if outcome.status == "FAIL"]
    log.info(
        "%d passed, %d failed, %d skipped",
        sum(o.status == "PASS" for o in outcomes),
        len(failed),
        sum(o.status == "SKIP" for o in outcomes),
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
