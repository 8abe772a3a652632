"""How jaxagent's commands compile and run XLA on a CPU: options that compile about twice as fast, compiled programs
kept on disk for the next run, XLA's buffers reused from one call to the next, and Python's garbage collector kept
out of the way while JAX traces.

A run compiles its update, sampler and log-prob programs once per shape bucket (the default job: ~150 programs).
On a CPU with a small model that is a large part of the job: three LOOP iterations and an evaluation of `tiny`
spent 335 of 602 s compiling with XLA's defaults. `train`, `evaluate` and `serve` call `prepare()` first.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import logging
import os

from jaxagent.cache import cache_dir

log = logging.getLogger(__name__)

# XLA:CPU with LLVM's optimisation level 1 instead of 2 and the classic fusion emitters: the same HLO program, whose
# machine code is less tuned. On the default job it halved compile time (335 -> 156 s) and ran no slower
# (the time outside compiling was 226 and 223 s).
QUICK_CPU_FLAGS = ("--xla_backend_optimization_level=1", "--xla_cpu_use_fusion_emitters=false")
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
KEEP_FREED_BYTES = 2**30  # what one heap may keep free; a larger block is still mapped per call
# Python's collector by default scans young objects every 700 net allocations and every object every 100 such scans.
# Tracing a model allocates millions of short-lived objects, so it ran ~860 scans (6 full ones over every module
# the process imported) in one micro `tiny` run: 0.7 of its 7.1 s. Set after the imports: 0.17 s (the run 6.6 s). A
# full scan still comes every 10M allocations, so cyclic garbage holding device buffers is still freed.
COLLECTOR_THRESHOLDS = (50_000, 20, 10)


def prepare() -> None:
    """Set all four up; call before the first JAX computation (XLA reads its flags when its backend starts, and
    threads started before `reuse_freed_memory` keep their own heaps) and after the imports."""
    use_quick_cpu_compiles()
    reuse_freed_memory()
    use_compilation_cache()
    collect_garbage_less_often()


def collect_garbage_less_often() -> None:
    """Set `COLLECTOR_THRESHOLDS` and freeze what exists now (the imported modules: the collector no longer scans
    them). On any backend: tracing is Python. JAXAGENT_GC_DEFAULTS=1 keeps Python's defaults."""
    if os.environ.get("JAXAGENT_GC_DEFAULTS"):
        return
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def use_quick_cpu_compiles() -> None:
    """Add `QUICK_CPU_FLAGS` to XLA_FLAGS on a CPU-only install.

    A flag the user already set in XLA_FLAGS is left as it is; JAXAGENT_XLA_DEFAULTS=1 keeps XLA's defaults. With a
    GPU or TPU plugin installed nothing is added (a GPU build of jaxlib refuses XLA:CPU flags).
    """
    if os.environ.get("JAXAGENT_XLA_DEFAULTS") or any(importlib.util.find_spec(p) for p in ACCELERATOR_PLUGINS):
        return
    current = os.environ.get("XLA_FLAGS", "")
    missing = [flag for flag in QUICK_CPU_FLAGS if flag.split("=")[0] not in current]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()


def reuse_freed_memory() -> None:
    """On a CPU-only install with glibc, keep memory XLA frees for its next call instead of returning it at once.

    XLA:CPU holds a program's intermediate values in one buffer per call, hundreds of MB for an update step. glibc
    maps a block that large fresh from the kernel (above its mmap threshold, or too large for a worker thread's
    arena) and unmaps it when freed, so the kernel zeroes every page again on the next call's first touch: `tiny`'s
    SFT step took 92K page faults and spent 19 % of its CPU time in the kernel. Served from one heap that keeps up
    to `KEEP_FREED_BYTES` free at its top, the next call reuses the same pages. JAXAGENT_MALLOC_DEFAULTS=1 keeps
    glibc's defaults.
    """
    if os.environ.get("JAXAGENT_MALLOC_DEFAULTS") or not glibc() or any(
            importlib.util.find_spec(p) for p in ACCELERATOR_PLUGINS):
        return
    mallopt = ctypes.CDLL(None).mallopt
    for param, value in ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, KEEP_FREED_BYTES), (M_TRIM_THRESHOLD, KEEP_FREED_BYTES)):
        if not mallopt(param, value):
            log.warning("glibc refused mallopt(%d, %d); XLA's buffers come fresh from the kernel", param, value)


def glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # another C library (macOS, musl)
        return False


def use_compilation_cache() -> None:
    """Keep XLA's compiled programs in the cache folder's `xla/` (`jaxagent.cache`).

    The next run, a resumed one, an evaluation or the next run of a sweep then loads them instead of compiling.
    JAX keys each program by its computation, shapes, flags and versions, so a changed program compiles anew.
    Setting JAX_COMPILATION_CACHE_DIR (empty: no cache) overrides the folder.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the user's choice, which JAX reads itself
        return
    import jax

    folder = cache_dir() / "xla"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only home still runs, compiling every program
        log.warning("cannot keep compiled programs in %s (%s); every run compiles them", folder, err)
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
