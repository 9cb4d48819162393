"""Handing freed memory back to the operating system between CPU training steps.

PyTorch's CPU tensors come from the C allocator. With glibc, a step's activations of ever
different sizes (packed rows vary in length) leave holes in the heap that the next step's larger
blocks do not fit, so the resident set creeps up step after step although each step needs about
the same. ``malloc_trim(0)`` returns the free pages (at the top of the heap and inside it) once
per step; the next step faults them back in. That costs little when a step churns little memory
(checkpointing) and much when it churns a lot (no checkpointing), which is why the loop trims
only under gradient checkpointing (measured: bench/README.md, "What each change bought").
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return getattr(libc, "malloc_trim", None)  # glibc only (not musl, not macOS)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
