"""Keeping freed memory: a freed large tensor's pages serve the next one without page faults."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

SCRIPT = """
import resource
import sys

import torch
from lws_lightning.allocator import retain_freed_memory

applied = retain_freed_memory() if sys.argv[1] == "retain" else None
# 64 MiB tensors, above glibc's largest mmap threshold, are allocated and freed as in a
# training loop. The faults of the last rounds are counted, after the heap reached its peak:
# in the first rounds it grows, because a freed chunk is a little short for the next aligned
# request until it merges with its neighbors.
for _ in range(12):
    torch.ones(2**24)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(ROUNDS):
    torch.ones(2**24)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
ROUNDS = 8
PAGES = ROUNDS * 2**26 // 4096


def page_faults(mode: str) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", f"ROUNDS = {ROUNDS}\n{SCRIPT}", mode],
        capture_output=True,
        text=True,
        check=True,
    )
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")
@pytest.mark.skipif(
    THP.exists() and "[always]" in THP.read_text(),
    reason="transparent huge pages on for all memory: fresh regions fault once per 2 MiB",
)
def test_freed_memory_is_reused_without_page_faults() -> None:
    default_applied, default_faults = page_faults("default")
    retain_applied, retain_faults = page_faults("retain")
    assert (default_applied, retain_applied) == ("None", "True")
    # By default glibc maps a fresh region for every tensor, and each of its 4 KiB pages
    # faults once. Kept memory is already mapped.
    assert default_faults > PAGES // 2
    assert retain_faults < PAGES // 16
