"""Host-process settings for XLA:CPU: keep freed memory instead of returning it to the OS every step.

XLA:CPU allocates one temporary buffer per execution (≈ 0.5 GB for the 8.4 M-parameter train step of
benchmarks/train_step.py) with malloc. glibc serves a request that large from a fresh `mmap` and `munmap`s it on
free, so every step page-faults the whole buffer in again: measured ≈ 130 k minor faults and ≈ 0.25 CPU-s of
kernel time per 0.75 s step, ≈ 20 % of the step (docs/benchmarks.md, "Host allocator"). With one malloc arena,
no mmap and no trimming, the buffer is reused from the heap and the faults disappear; the costs: the process
keeps its peak heap (it never shrinks; programs of growing sizes fragment it: benchmarks/swa.py's sweep reached
~3x its largest program's footprint, so that script skips a kernel that may not fit in the memory left), and every
thread allocates from one arena behind one lock. So it is
opt-in: it pays for a single-device CPU step (the benchmarks call it; JAXSCALE_MALLOC_TUNING=0 turns it off)
and loses where many threads allocate at once: the 8-fake-device demo ran 121 s instead of 103 s with it.
Irrelevant on GPU/TPU, whose device memory XLA manages itself.

`step_compiler_options` is the other host-side setting: XLA options for the donated train steps of experiments/.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import warnings

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@functools.cache
def tune_cpu_allocator() -> bool:
    """Make glibc malloc reuse large freed blocks (one arena, no mmap, no trim). Returns True when applied.

    Call it first thing in a script, before JAX runs anything: threads that already own a malloc arena keep it,
    so calling it after the CPU backend has started helps less (a warning says so). A no-op returning False
    off Linux/glibc, or when the environment sets JAXSCALE_MALLOC_TUNING=0. Idempotent.
    """
    if os.environ.get("JAXSCALE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    ok = all(mallopt(k, v) == 1 for k, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    if ok and "jax" in sys.modules and _backend_started():
        warnings.warn("tune_cpu_allocator() called after the JAX backend started: XLA's worker threads keep their "
                      "own malloc arenas; call it before the first JAX computation.", stacklevel=2)
    return ok


def _backend_started() -> bool:
    from jax._src import xla_bridge  # private, but the only way to ask without starting the backend

    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


# With region analysis, XLA:CPU's copy insertion sees that a donated buffer's old value is read before the fusion
# that overwrites it in place, instead of copying it first: the trainer's skip-on-non-finite select over AdamW's
# moments copied both moments of every parameter each step (the optimizer phase 1.5x its memory-traffic floor),
# and a scanned stack copied its loop buffers. Measured (docs/benchmarks.md, sixteenth session): trainer step
# 0.985x dense, 0.945x MoE; results bit-identical.
CPU_STEP_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def step_compiler_options() -> dict | None:
    """`compiler_options` for `jax.jit` of a donated train step: CPU_STEP_OPTIONS when JAX's default backend is
    the CPU, else None (XLA's defaults; the option names XLA:CPU's pass)."""
    import jax

    return dict(CPU_STEP_OPTIONS) if jax.default_backend() == "cpu" else None
