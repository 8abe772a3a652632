"""Attention forward + backward at long sequences: jaxagent's blockwise kernel against the strongest attention the
platform has, in one run with interleaved repetitions.

    python -m benchmarks.attention [--lengths 4096 16384 32768] [--repeats 5] [--dtype bfloat16]

One layer of Qwen2.5-7B's attention shapes (28 query heads sharing 4 key/value heads, head dim 128), batch 1, causal,
the last 5 % of each row padding. Each variant computes d/d(q, k, v) of sum(out * cotangent) in one jitted program:

    blockwise     jaxagent.models.attention.blockwise_attention (online softmax, custom VJP), block 512: portable
    jaxagent      jaxagent.models.attention.attention(kernel="blockwise"), what the model runs: on a GPU, cuDNN's
                  kernel when every row is one sequence from slot 0 (checked on the data), else the portable one
    dense         jaxagent.models.attention.dense_attention (all scores materialised; skipped where it cannot fit)
    cudnn         jax.nn.dot_product_attention(implementation="cudnn") with is_causal and sequence lengths (GPU)
    xla           jax.nn.dot_product_attention(implementation="xla") (all scores materialised)

Per length it prints one JSON line: the median / min / max seconds of each variant, XLA's compiled temporary memory
(the program's scratch: scores, softmax statistics), achieved TFLOP/s (causal: half of 4·N·T²·D forward, 2.5× that
backward), each variant's output error against the dense f32 reference where that fits (‖a − ref‖ / ‖ref‖), and
blockwise's time ratio to the fastest other variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import machine
from jaxagent.models.attention import KeySource, attention, blockwise_attention, dense_attention

KV_HEADS, GROUP, HEAD_DIM = 4, 7, 128  # Qwen2.5-7B


def inputs(length: int, dtype, seed: int = 0):
    """q [1, K, G, T, D], k and v [1, K, T, D], cotangent like q, and the real (unpadded) length."""
    rng = np.random.default_rng(seed)
    real = length - length // 20
    shape = (1, KV_HEADS, GROUP, length, HEAD_DIM)
    q = jnp.asarray(rng.standard_normal(shape), dtype)
    k = jnp.asarray(rng.standard_normal((1, KV_HEADS, length, HEAD_DIM)), dtype)
    v = jnp.asarray(rng.standard_normal((1, KV_HEADS, length, HEAD_DIM)), dtype)
    cot = jnp.asarray(rng.standard_normal(shape), dtype)
    return q, k, v, cot, real


def ours(kernel: str, length: int, real: int, block: int = 512):
    segments = (jnp.arange(length) < real).astype(jnp.int32)[None]
    order = jnp.arange(length, dtype=jnp.int32)[None]
    scale = HEAD_DIM ** -0.5

    def out(q, k, v):
        source = KeySource(k, v, segments, order)
        if kernel == "dense":
            return dense_attention(q, [source], segments, order, scale)
        if kernel == "jaxagent":  # what the model calls: on a GPU, cuDNN when the rows allow it
            return attention(q, [source], segments, order, scale, "blockwise", block, block)
        return blockwise_attention(q, [source], segments, order, scale, block, block)
    return out


def platform_attention(implementation: str, real: int):
    """jax.nn.dot_product_attention in its [B, T, N, D] layout, padding given as sequence lengths."""
    lengths = jnp.asarray([real], jnp.int32)

    def out(q, k, v):
        b, kh, g, t, d = q.shape
        q_btnd = q.reshape(b, kh * g, t, d).transpose(0, 2, 1, 3)
        result = jax.nn.dot_product_attention(q_btnd, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                              is_causal=True, query_seq_lengths=lengths,
                                              key_value_seq_lengths=lengths, implementation=implementation)
        return result.transpose(0, 2, 1, 3).reshape(b, kh, g, t, d)
    return out


def masked_real(x, real):
    return x[..., :real, :]  # padding queries' outputs differ by convention (zeros vs anything); compare real rows


def step(out_fn):
    """jit of (output, grads wrt q, k, v) of sum(out * cotangent)."""
    def f(q, k, v, cot):
        value, pullback = jax.vjp(out_fn, q, k, v)
        return (value, *pullback(cot))
    return jax.jit(f)


def measure(lengths, repeats: int, dtype) -> list[dict]:
    on_gpu = jax.devices()[0].platform == "gpu"
    lines = []
    for length in lengths:
        q, k, v, cot, real = inputs(length, dtype)
        variants = {"blockwise": ours("blockwise", length, real), "jaxagent": ours("jaxagent", length, real),
                    "dense": ours("dense", length, real),
                    "xla": platform_attention("xla", real)}
        if on_gpu:
            variants["cudnn"] = platform_attention("cudnn", real)
        compiled, memory, skipped = {}, {}, {}
        for name, fn in variants.items():
            try:
                program = step(fn).lower(q, k, v, cot).compile()
                memory[name] = program.memory_analysis().temp_size_in_bytes
                jax.block_until_ready(program(q, k, v, cot))  # warm-up; an out-of-memory shows here
                compiled[name] = program
            except Exception as err:  # noqa: BLE001 - a variant that cannot run at this length is reported, not fatal
                skipped[name] = str(err).splitlines()[0][:160]
        reference = _reference(q, k, v, real, length) if "dense" in compiled else None
        errors = {}
        if reference is not None:
            for name, program in compiled.items():
                got = np.asarray(masked_real(program(q, k, v, cot)[0], real), np.float32)
                errors[name] = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
        times: dict[str, list[float]] = {name: [] for name in compiled}
        for _ in range(repeats):  # interleaved: drift in clocks or load hits every variant alike
            for name, program in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(program(q, k, v, cot))
                times[name].append(time.perf_counter() - start)
        flops = 3.5 * 2 * KV_HEADS * GROUP * length * length * HEAD_DIM  # causal fwd (half of 4NT²D) + 2.5x bwd
        seconds = {name: {"median": statistics.median(t), "min": min(t), "max": max(t)} for name, t in times.items()}
        others = {name: s["median"] for name, s in seconds.items() if name not in ("blockwise", "jaxagent")}
        fastest = min(others, key=others.get) if others else None
        lines.append({
            "length": length, "dtype": jnp.dtype(dtype).name, "repeats": repeats, "seconds": seconds,
            "tflops": {name: round(flops / s["median"] / 1e12, 2) for name, s in seconds.items()},
            "temp_memory_mb": {name: round(b / 2**20, 1) for name, b in memory.items()},
            "error_vs_dense_f32": errors, "skipped": skipped,
            "fastest_other": fastest,
            **{f"{name}_time_ratio_vs_fastest_other": (round(seconds[name]["median"] / others[fastest], 3)
                                                         if fastest and name in seconds else None)
               for name in ("blockwise", "jaxagent")},
        })
        print(json.dumps(lines[-1]), flush=True)
    return lines


def _reference(q, k, v, real, length):
    """The dense kernel's output in float32 (real query rows)."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    try:
        out = jax.jit(ours("dense", length, real))(f32(q), f32(k), f32(v))
        return np.asarray(masked_real(out, real))
    except Exception:  # noqa: BLE001 - too large for f32 scores: no reference at this length
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    lines = measure(args.lengths, args.repeats, jnp.dtype(args.dtype))
    summary = {**machine(with_ceilings=False), "device": str(jax.devices()[0].device_kind),
               "benchmark": "attention", "results": lines}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
