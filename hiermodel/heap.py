"""Keep freed memory in the process's heap (glibc), so that each training step reuses it.

A step at Online Retail allocates several tensors of 15-60 MB (the scorer's users × items × hidden
activations and their gradients). glibc serves every block over 32 MB from fresh pages of its own
(mmap) and returns them at free, so every step page-faults and zeroes them all again. With those
blocks taken from the heap and the heap never trimmed, a freed block is reused: the same numbers up
to rounding, a plain step about 1.3 × faster here. The cost: the process keeps its highest memory
use until it ends (BENCHMARKS.md). So only the processes that train or evaluate call this (the
`hierfed` command, a site's ClientApp, the ServerApp), each for itself: nothing is passed on to
the processes they start.

Off with HIERFED_KEEP_FREED_MEMORY=0 (or false, no, off), and when the user set glibc's heap
thresholds themselves (MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_,
MALLOC_TOP_PAD_, or the same in GLIBC_TUNABLES). Where the C library is not glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h) and the values set: no mmap for large blocks, never trim
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # mallopt takes an int
USER_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
USER_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold",
                 "glibc.malloc.top_pad")
OPT_OUT = "HIERFED_KEEP_FREED_MEMORY"
_done = False  # once per process


def reuse_freed_memory() -> bool:
    """Set this process's heap so (once); whether it is set now."""
    global _done
    if _done:
        return True
    opted_out = os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    users_own = any(v in os.environ for v in USER_VARIABLES) or any(t in tunables for t in USER_TUNABLES)
    if opted_out or users_own:
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    _done = all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())
    return _done


def _glibc_mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no such library or function
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
