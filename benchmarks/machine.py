"""What every benchmark reports about the machine it ran on: the CPU and both frameworks' matmul ceilings, measured
in the same run, so figures from different machines can be read side by side."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (or `cpuinfo`, its text), with its family, model and widest vector
    unit: a virtual machine may name two CPUs alike ("AMD EPYC") whose XLA throughput is 2-3x apart, and these tell
    them apart. What the platform says where there is no /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():  # the first processor's block is enough
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = fields.get("flags", "").split()
    vector = next((unit for flag, unit in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    details += [vector] if vector else []
    return f"{name} ({', '.join(details)})" if details else name


def matmul_gflops(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a float32 size² matmul in XLA (jitted) and in torch, medians of interleaved repetitions."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = torch.ones(size, size)
    t @ t
    xla, torch_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        xla.append(time.perf_counter() - start)
        start = time.perf_counter()
        t @ t
        torch_times.append(time.perf_counter() - start)
    flops = 2 * size**3 / 1e9
    return {"xla": round(flops / statistics.median(xla), 1), "torch": round(flops / statistics.median(torch_times), 1)}


def numpy_matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of a float32 size² matmul in NumPy's BLAS, the best of `repeats`: a quarter-second measure of how fast
    this machine is now. Two virtual machines of the same CPU model can differ 2-3x (another tenant's load, the host's
    clocks), which a log's timings are read against."""
    import numpy as np

    a = np.ones((size, size), np.float32)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return round(2 * size**3 / 1e9 / best, 1)


def machine(with_ceilings: bool = True) -> dict:
    """The machine fields of a benchmark's JSON line."""
    import jax
    import torch
    import transformers

    out = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(),
           "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}}
    if with_ceilings:
        out["matmul_2048_f32_gflops"] = matmul_gflops()
    return out
