"""Keeping freed CPU memory for reuse across training steps (glibc's malloc, Linux).

PyTorch allocates CPU tensors with the C library's malloc. glibc serves a block above its mmap
threshold (dynamic, at most 32 MiB on 64-bit systems) with a fresh mmap and unmaps it again on
free, so a training step whose activations are that large maps them anew on every step and the
kernel zeroes every page on first touch: one page fault per 4 KiB. A ResNet-20 step at batch 512
(33.5 MB per 16-channel activation) takes hundreds of thousands of them, more with mixq's quantizers
than without (their outputs and gradients are more such tensors); `benchmarks/bench_train_step.py`
counts them per step and measures both settings (`--malloc keep`, the default, and `default`).

`keep_freed_host_memory()` tells glibc to serve every block from its heaps (M_MMAP_MAX = 0) and to
keep freed memory instead of returning it to the system (M_TRIM_THRESHOLD at its maximum): after
the first step, later steps reuse the same pages, as a caching allocator does on the GPU. The
process's resident memory then stays at its high-water mark; `keep_freed_host_memory(False)` puts
glibc's default values back (not its dynamic mmap threshold, which any mallopt call turns off) and
hands the free memory to the system (malloc_trim).

It is process-wide, so the library never calls it on import: `mixq train` and
`mixq.pipeline.train_run` call it for CPU runs unless MIXQ_KEEP_FREED_MEMORY=0, and the run's
env.json records whether it was on. Elsewhere (macOS, Windows, musl) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h) and the defaults they have before any call
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD_BYTES, DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEEP_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: the largest it accepts
ENV_VAR = "MIXQ_KEEP_FREED_MEMORY"

_state = {"kept": False}


def _glibc():
    """The C library when it is glibc (the only one whose mallopt takes these parameters), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_host_memory(enabled: bool = True) -> bool:
    """Keep (True) or stop keeping (False) freed CPU memory for reuse; returns whether the setting
    now in force is the one asked for (False where the C library is not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    if enabled:
        ok = (libc.mallopt(M_MMAP_MAX, 0) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD_BYTES) == 1)
    else:
        ok = (libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD_BYTES) == 1)
        libc.malloc_trim(0)
    _state["kept"] = enabled and ok
    return ok


def freed_host_memory_kept() -> bool:
    """Whether `keep_freed_host_memory()` is in force in this process."""
    return _state["kept"]


def wanted() -> bool:
    """Whether a CPU training run should keep freed memory: yes unless MIXQ_KEEP_FREED_MEMORY=0."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        raise ValueError(f"{ENV_VAR}={value!r}: use 1 (keep freed CPU memory for reuse, the "
                         "default) or 0 (glibc's defaults)")
    return value in ("1", "true", "yes", "on")
