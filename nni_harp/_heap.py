"""glibc malloc tuning for the processes the command lines start (private infrastructure).

By default glibc ``mmap``-s every buffer above a few hundred KiB and ``munmap``-s it when freed, so
each training step or forward pass page-faults its activations (and HARP's score-sized
temporaries) in again. :func:`keep_freed_memory` raises the mmap and trim thresholds so that freed
buffers stay in the heap for reuse, which is what jemalloc / tcmalloc give (PyTorch's CPU tuning
guide). Measured on the project's 2-core machine: efficientnet_b0's batch-32 forward passes spent
most of their time in the kernel (6.7 M minor faults, 17 s of system time in 14 passes,
``benchmarks/speedup.py``); README's main command (``nni-harp prune resnet18 --mode structured``)
took 101.5-110.5 s (mean 106.6; system time 3.8-4.6 s) in four runs with these thresholds (two set
through glibc's environment variables, two by this function) against 106.4-114.0 s (mean 110.4;
5.1-6.8 s) in three without. The price is a process that keeps its peak heap.

The command lines (``nni-harp``, ``python -m nni_harp.trial``) call it at start; the library never
does (a process-wide choice is the application's). A user who sets glibc's thresholds through the
environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or a ``glibc.malloc`` tunable in
``GLIBC_TUNABLES``) keeps them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Mapping

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

#: glibc's ``mallopt`` parameter numbers (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Buffers up to 1 GiB come from the heap; freed memory is trimmed only above 2 GiB.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _user_set(environ: Mapping[str, str]) -> bool:
    return any(name in environ for name in _USER_VARIABLES) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (see the module docstring). Returns
    whether it applied: ``False`` off Linux, without glibc's ``mallopt``, or where the user set
    the thresholds in ``environ`` (default ``os.environ``)."""
    if platform.system() != "Linux" or _user_set(os.environ if environ is None else environ):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None)
    except OSError:
        return False
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
