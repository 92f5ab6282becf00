"""Helpers of the scaling tests: the command-line app in a subprocess with tiny settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# A net of width 4 and few samples, so that every iteration and evaluation is quick on a CPU.
# Evaluation reads 1 batch per task during training and 2 in the final test.
TINY = (
    "logger=none",
    "+model.architecture_options.width=4",
    "+model.architecture_options.hidden=8",
    "model.nes_samples=4",
    "model.sgd_samples=2",
    "data.batch_size=4",
    "data.eval_batch_size=64",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=2",
    "callbacks.progress_bar.refresh_rate=0",
)


def free_local_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_env(**extra: str) -> dict[str, str]:
    """Environment of an app subprocess: local-only DDP, one thread, this folder importable."""
    python_path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "PYTHONPATH": python_path,
        # One thread per process keeps runs fast when other processes share the cores.
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
        # gloo talks over the loopback interface only.
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        **extra,
    }


def run_app(
    *overrides: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m lws_lightning`` with ``overrides`` in ``cwd``; outputs go under it."""
    return subprocess.run(
        [sys.executable, "-m", "lws_lightning", *overrides, f"paths.root_dir={cwd}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env or app_env(),
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root shared by the session's runs; the first run installs mnist_trio into it."""
    from lws_lightning.data.mnist_trio import DEFAULT_FASHION_SOURCE

    if not (Path(DEFAULT_FASHION_SOURCE) / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(
            f"Fashion-MNIST is not installed in {DEFAULT_FASHION_SOURCE}; run "
            "scripts/install_data.sh."
        )
    return tmp_path_factory.mktemp("scale_data")
