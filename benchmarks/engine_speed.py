"""Compare the literal and batched engines: iterations per second, GFLOP/s and peak memory.

Each case builds one net per engine from the same seed and runs full LWS iterations
(:func:`lws_step`: NES evaluation, π update, SGD backward and an Adam step) on random data. The
engines alternate, literal then batched, so that load from other processes affects both alike;
the reported time is the median over the timed iterations. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on one further iteration of each engine (convs and
matmuls only). Memory is measured in a fresh subprocess per engine, which runs one iteration:
on CPU the peak resident set size during the iteration (VmHWM, Linux only) and its increase
over the size before the iteration; on CUDA the same for allocated tensor memory.

This is a benchmark, not a test. Run it from the repository root:

    .venv/bin/python benchmarks/engine_speed.py            # all cases, a few minutes per case
    .venv/bin/python benchmarks/engine_speed.py --quick    # narrow nets, small batches
    .venv/bin/python benchmarks/engine_speed.py --cases dkl_convnet --device cuda
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from lws_lightning.allocator import retain_freed_memory
from lws_lightning.engine import Engine, StepConfig, build_engine, lws_step
from lws_lightning.nets import MultiTaskNet, build_net
from lws_lightning.sharing import AssignmentDistribution

ENGINE_NAMES = ("literal", "batched")
# π of the late-training cases: each (layer, task) puts 1 - (K - 1) * P_MIN on one bank, which
# gives a mean entropy of about 0.02 nats for K = 20.
P_MIN_CONCENTRATED = 1e-4


@dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Attributes:
        name: Case name used on the command line and in the table.
        architecture: Name in ``lws_lightning.nets.ARCHITECTURES``.
        num_tasks: T.
        num_banks: K.
        input_shape: ``(C, H, W)`` of one example.
        options: Architecture builder options.
        concentrated: Start from a concentrated π (late training) instead of a uniform one.
        batch_size: Examples per task in each of the NES and SGD batches.
        iterations: Timed iterations per engine.
        target: Speed-up (batched it/s over literal it/s) that the case should reach.
        quick_options: Options that replace ``options`` with ``--quick``.
    """

    name: str
    architecture: str
    num_tasks: int
    num_banks: int
    input_shape: tuple[int, int, int]
    options: dict[str, Any] = field(default_factory=dict)
    concentrated: bool = False
    batch_size: int = 16
    iterations: int = 3
    target: float | None = None
    quick_options: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("dkl_convnet", "dkl_convnet", 3, 3, (1, 28, 28), target=3.0, quick_options={"width": 8}),
    Case(
        "routing_convnet",
        "routing_convnet",
        20,
        20,
        (3, 32, 32),
        target=8.0,
        quick_options={"width": 8, "hidden": 32},
    ),
    Case(
        "slo_convnet",
        "slo_convnet",
        20,
        20,
        (1, 105, 105),
        iterations=2,
        target=2.0,
        quick_options={"width": 8},
    ),
    Case(
        "resnet18_cifar",
        "resnet18",
        20,
        20,
        (3, 32, 32),
        options={"variant": "cifar"},
        iterations=2,
        quick_options={"variant": "cifar", "base_width": 8},
    ),
    Case(
        "dkl_convnet_concentrated",
        "dkl_convnet",
        3,
        3,
        (1, 28, 28),
        concentrated=True,
        target=5.0,
        quick_options={"width": 8},
    ),
    Case(
        "slo_convnet_concentrated",
        "slo_convnet",
        20,
        20,
        (1, 105, 105),
        concentrated=True,
        iterations=2,
        target=5.0,
        quick_options={"width": 8},
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES}


@dataclass
class Run:
    """One engine's net, π, optimizer and sampling generator for a case."""

    net: MultiTaskNet
    distribution: AssignmentDistribution
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    engine: Engine

    def step(self, nes_batch: tuple[Tensor, Tensor], sgd_batch: tuple[Tensor, Tensor]) -> None:
        lws_step(
            self.net,
            self.distribution,
            self.optimizer,
            nes_batch,
            sgd_batch,
            StepConfig(),
            self.generator,
            engine=self.engine,
        )


def quick_case(case: Case) -> Case:
    return replace(case, options=case.quick_options, batch_size=4, iterations=1)


def build_runs(
    case: Case, device: torch.device, engines: tuple[str, ...] = ENGINE_NAMES, seed: int = 0
) -> dict[str, Run]:
    """Build one :class:`Run` per engine in ``engines``, identical at the start."""
    torch.manual_seed(seed)
    net = build_net(
        case.architecture,
        case.num_banks,
        [10] * case.num_tasks,
        case.input_shape,
        **case.options,
    ).to(device)
    distribution = build_distribution(case, net, seed).to(device)
    runs = {}
    for name in engines:
        run_net = copy.deepcopy(net)
        runs[name] = Run(
            run_net,
            copy.deepcopy(distribution),
            torch.optim.Adam(run_net.parameters(), lr=1e-3),
            torch.Generator().manual_seed(seed),
            build_engine(name),
        )
    return runs


def build_distribution(case: Case, net: MultiTaskNet, seed: int) -> AssignmentDistribution:
    if not case.concentrated:
        return AssignmentDistribution(net.num_banks, case.num_tasks)
    generator = torch.Generator().manual_seed(seed + 1)
    layers = len(net.num_banks)
    top = torch.randint(case.num_banks, (layers, case.num_tasks), generator=generator)
    prior = torch.full((layers, case.num_tasks, case.num_banks), P_MIN_CONCENTRATED)
    prior.scatter_(-1, top.unsqueeze(-1), 1 - (case.num_banks - 1) * P_MIN_CONCENTRATED)
    return AssignmentDistribution(
        net.num_banks, case.num_tasks, p_min=P_MIN_CONCENTRATED, prior=prior.double()
    )


def make_batches(
    case: Case, device: torch.device, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        x = torch.randn(case.num_tasks, case.batch_size, *case.input_shape, generator=generator)
        y = torch.randint(10, (case.num_tasks, case.batch_size), generator=generator)
        batches.append((x.to(device), y.to(device)))
    return batches[0], batches[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engines(case: Case, device: torch.device, warmup: int) -> dict[str, Any]:
    """Time alternating iterations of both engines and count each engine's FLOPs."""
    runs = build_runs(case, device)
    nes_batch, sgd_batch = make_batches(case, device)
    entropy = float(runs["literal"].distribution.entropy().mean())
    times: dict[str, list[float]] = {name: [] for name in ENGINE_NAMES}
    for iteration in range(warmup + case.iterations):
        for name in ENGINE_NAMES:
            synchronize(device)
            start = time.perf_counter()
            runs[name].step(nes_batch, sgd_batch)
            synchronize(device)
            if iteration >= warmup:
                times[name].append(time.perf_counter() - start)
    flops = {}
    for name in ENGINE_NAMES:
        with FlopCounterMode(display=False) as counter:
            runs[name].step(nes_batch, sgd_batch)
        flops[name] = counter.get_total_flops()
    return {"entropy": entropy, "times": times, "flops": flops}


def measure_memory(case: Case, engine_name: str, device: torch.device) -> dict[str, float]:
    """Run one iteration of one engine in this process; return its memory use in MiB.

    On CPU, ``peak_mib`` is the peak resident set size during the iteration and
    ``baseline_mib`` the resident set size before it. The peak is reset first through
    ``/proc/self/clear_refs``, because a process started by ``subprocess`` inherits its
    parent's ``ru_maxrss``. On CUDA both are allocated tensor memory.
    """
    run = build_runs(case, device, engines=(engine_name,))[engine_name]
    nes_batch, sgd_batch = make_batches(case, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        baseline = read_status_kib("VmRSS") * 1024
    run.step(nes_batch, sgd_batch)
    synchronize(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = read_status_kib("VmHWM") * 1024
    return {"baseline_mib": baseline / 2**20, "peak_mib": peak / 2**20}


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (VmHWM) to its current size (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def read_status_kib(field_name: str) -> int:
    """Return a kB field of ``/proc/self/status``, such as VmRSS or VmHWM."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name} field.")


def memory_in_subprocess(case_name: str, engine_name: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--measure-memory",
        engine_name,
        "--cases",
        case_name,
        "--device",
        args.device,
    ]
    if args.quick:
        command.append("--quick")
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.allocator != "default":
        command += ["--allocator", args.allocator]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"The memory measurement of {engine_name} on {case_name} failed:\n"
            f"{completed.stderr[-3000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def matmul_rate(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Return the median GFLOP/s of a float32 ``size``×``size`` matrix product on ``device``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[1:]) / 1e9


def format_row(case: Case, timing: dict[str, Any], memory: dict[str, dict] | None) -> str:
    median = {name: statistics.median(timing["times"][name]) for name in ENGINE_NAMES}
    speed = {name: 1.0 / median[name] for name in ENGINE_NAMES}
    ratio = speed["batched"] / speed["literal"]
    gflop = {name: timing["flops"][name] / 1e9 for name in ENGINE_NAMES}
    gflops = {name: gflop[name] * speed[name] for name in ENGINE_NAMES}
    if case.target is None:
        target = "none"
    else:
        target = f"≥ {case.target:g}×: {'met' if ratio >= case.target else 'not met'}"
    cells = [
        case.name,
        f"{case.num_tasks}/{case.num_banks}/{case.batch_size}",
        f"{timing['entropy']:.3f}",
        f"{speed['literal']:.3f}",
        f"{speed['batched']:.3f}",
        f"{ratio:.2f}×",
        target,
        f"{gflop['literal']:.3g} / {gflop['batched']:.3g}",
        f"{gflops['literal']:.3g} / {gflops['batched']:.3g}",
    ]
    if memory is not None:
        literal, batched = memory["literal"], memory["batched"]
        literal_increase = literal["peak_mib"] - literal["baseline_mib"]
        batched_increase = batched["peak_mib"] - batched["baseline_mib"]
        cells += [
            f"{literal['peak_mib']:.0f} / {batched['peak_mib']:.0f}",
            f"{batched['peak_mib'] / literal['peak_mib']:.2f}",
            f"{literal_increase:.0f} / {batched_increase:.0f}",
            f"{batched_increase / max(literal_increase, 1.0):.2f}",
        ]
    return "| " + " | ".join(cells) + " |"


def table_header(with_memory: bool) -> str:
    columns = [
        "case",
        "T/K/B",
        "H(π)",
        "literal it/s",
        "batched it/s",
        "speed-up",
        "target",
        "GFLOP/it lit. / bat.",
        "GFLOP/s lit. / bat.",
    ]
    if with_memory:
        columns += [
            "peak MiB lit. / bat.",
            "peak ratio",
            "iteration MiB lit. / bat.",
            "iteration ratio",
        ]
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=sorted(CASES_BY_NAME),
        default=[case.name for case in CASES],
        help="cases to run (default: all)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--quick", action="store_true", help="narrow nets, batch 4, one timed iteration"
    )
    parser.add_argument("--iterations", type=int, help="timed iterations per engine")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed iterations per engine first (default 1)"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--allocator",
        choices=["default", "retain"],
        default="default",
        help="C allocator: glibc's defaults, or retain (keep freed memory for reuse, as "
        "python -m lws_lightning does by default; see lws_lightning/allocator.py)",
    )
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--measure-memory", choices=ENGINE_NAMES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.allocator == "retain" and not retain_freed_memory():
        raise SystemExit("--allocator retain needs glibc; use --allocator default.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = [CASES_BY_NAME[name] for name in args.cases]
    if args.quick:
        cases = [quick_case(case) for case in cases]
    if args.iterations is not None:
        cases = [replace(case, iterations=args.iterations) for case in cases]

    if args.measure_memory is not None:
        print(json.dumps(measure_memory(cases[0], args.measure_memory, device)))
        return

    print(f"machine: {machine_description(device)}; torch {torch.__version__}")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"allocator: {args.allocator}")
    matmul_size = 8192 if device.type == "cuda" else 2048
    print(
        f"float32 {matmul_size}×{matmul_size} matrix product: "
        f"{matmul_rate(device, matmul_size):.0f} GFLOP/s"
    )
    print()
    print(table_header(not args.skip_memory), flush=True)
    for case in cases:
        timing = time_engines(case, device, args.warmup)
        memory = None
        if not args.skip_memory:
            memory = {name: memory_in_subprocess(case.name, name, args) for name in ENGINE_NAMES}
        print(format_row(case, timing, memory), flush=True)


if __name__ == "__main__":
    main()
