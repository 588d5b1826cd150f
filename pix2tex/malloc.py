"""Keep freed memory in the process for reuse (glibc malloc), for training on a CPU.

A training step allocates and frees the same few GB of activations and gradients every step. By
default glibc serves each block over its mmap threshold (at most 32 MB) with fresh pages from the
kernel and unmaps it on free, and trims the top of the heap: every step then faults in, and the
kernel zeroes, those pages again. On the 2-core machine this project is measured on that is 15-25 %
of a bf16 step of settings/config.yaml. `keep_freed_memory()` turns both off (`mallopt`), so freed
blocks go back to malloc's free lists and the next step reuses them; the same effect as starting
Python with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>, set from inside the process.

The cost: memory the process has freed is not returned to the OS until it exits (the peak stays
the peak; it was ~5-10 % over PyTorch's own peak here from fragmentation). Only glibc has these
knobs; elsewhere (macOS, musl) this does nothing. PIX2TEX_KEEP_FREED_MEMORY=0 turns it off.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest value the int parameter takes


def glibc():
    """The process's C library if it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Serve every allocation from malloc's heap and never trim it. True if it took effect."""
    if os.environ.get("PIX2TEX_KEEP_FREED_MEMORY", "1") == "0":
        return False
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
