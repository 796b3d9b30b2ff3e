"""Freed memory kept for the next forward pass on a CPU (Linux with glibc).

An image encoder's activations run to tens of MB each. glibc serves blocks that large straight from
the kernel (mmap) and hands them back when they are freed, so every forward pass faults all of its
pages in afresh. On this project's 2-core CPU that was about a third of LiteMedSAM's encoder alone
(1.8 s against 1.25 s with the blocks kept; the README gives the first clicks). Raising glibc's
mmap and trim thresholds lets freed blocks be reused. The cost: the process keeps what it once
needed instead of returning it between passes, so its resident memory stays near its peak.
``MEDFM_RETURN_FREED_MEMORY=1`` keeps glibc's own behaviour.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

#: mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap and are reused: above any single activation of a 2D encoder
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = (1 << 31) - 1


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse; False where it does not apply."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if os.environ.get("MEDFM_RETURN_FREED_MEMORY", "") in ("1", "true", "yes"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):  # another C library under the same name: leave it be
        return False
