"""Freed memory kept for reuse on a CPU: a forward pass no longer faults its large blocks in afresh."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt: Linux with glibc only (the platform)",
)

# A fresh process each time: glibc's settings are per process and cannot be undone.
_ALLOCATE = """
import json, resource, sys
import torch
from MedFMLib.engines import create_engine
engine = create_engine("sam_tiny", checkpoint=sys.argv[1], device="cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = torch.ones(16 * 1024 * 1024)  # 64 MiB, as large as an encoder's activations
    del block
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _page_faults(checkpoint, **env) -> int:
    result = subprocess.run([sys.executable, "-c", _ALLOCATE, str(checkpoint)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])["faults"]


def test_a_cpu_engine_keeps_freed_blocks_so_the_next_pass_does_not_fault_them_in_again(tiny_sam):
    pages = 64 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")
    returned = _page_faults(tiny_sam, MEDFM_RETURN_FREED_MEMORY="1")
    kept = _page_faults(tiny_sam, MEDFM_RETURN_FREED_MEMORY="0")
    assert returned > 8 * pages  # glibc's own way: each 64 MiB block mapped and faulted in anew
    assert kept < 2 * pages  # faulted in once, then reused
