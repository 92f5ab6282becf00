"""The engine benchmark script runs and prints one table row per case (not a timing test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "engine_speed.py"


def test_quick_run_prints_rows() -> None:
    command = [sys.executable, str(SCRIPT), "--quick", "--warmup", "0", "--threads", "1"]
    command += ["--cases", "dkl_convnet", "dkl_convnet_concentrated"]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)

    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    assert any("matrix product" in line for line in lines[:5])
    rows = [line for line in lines if line.startswith("| dkl_convnet")]
    assert [row.split(" | ")[0] for row in rows] == ["| dkl_convnet", "| dkl_convnet_concentrated"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 13
        literal_speed, batched_speed = float(cells[3]), float(cells[4])
        assert literal_speed > 0
        assert batched_speed > 0
        ratio = float(cells[5].rstrip("×"))
        assert ratio == pytest.approx(batched_speed / literal_speed, abs=0.01)
