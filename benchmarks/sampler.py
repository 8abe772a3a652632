"""Sampler throughput against transformers' `generate`, in the same run, on the same safetensors.

    python -m benchmarks.sampler [--batches 1 16] [--prompt-len 64] [--new-tokens 128] [--repeats 3]

A random Qwen2-architecture model of about 55M parameters is saved once; both sides load it, decode greedily
(`use_cache=True` on the PyTorch side) from the same random prompts, and are timed over whole calls (prefill +
decode) after a warm-up. Prints one JSON line: tokens/s of each side and their ratio per batch size, jaxagent's
compile time (the warm-up's extra time, reported apart), and whether the greedy tokens were identical.

`--gpu` instead measures a ~1.5B-parameter Qwen2-shaped model in bf16 on the accelerator (jaxagent only) and
reports tokens/s as a fraction of the HBM roofline: bandwidth / (weight bytes + batch x context x KV bytes/token).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxagent.models.hf import load_hf_params
from jaxagent.sampling import Sampler, SamplingParams

CPU_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
GPU_MODEL = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)  # Qwen2.5-1.5B's shape


def build_model(folder: Path, shape: dict, dtype: str = "float32") -> int:
    """Save a random Qwen2 model of `shape` to `folder`; returns its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**shape, max_position_embeddings=4096)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def time_calls(fn, repeats: int) -> tuple[float, list[float], object]:
    """First call's seconds (warm-up, includes compilation), median of `repeats` further calls, last result."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return first, times, result


def jaxagent_side(folder: Path, prompts: np.ndarray, new_tokens: int, repeats: int, dtype: str = "float32"):
    config, params = load_hf_params(folder, param_dtype=dtype, dtype=dtype)
    sampler = Sampler(config, max_len=prompts.shape[1] + new_tokens)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)

    def run():
        batch, result = sampler.generate(params, sampler.start(params, prompts.tolist()), sampling, jax.random.key(0))
        jax.block_until_ready(batch.state)
        return result.tokens

    first, times, tokens = time_calls(run, repeats)
    return first, times, tokens, sampler.compile_count


def torch_side(folder: Path, prompts: np.ndarray, new_tokens: int, repeats: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.from_numpy(prompts.astype(np.int64))

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                                 eos_token_id=None)
        return out[:, prompts.shape[1]:].tolist()

    first, times, tokens = time_calls(run, repeats)
    return first, times, tokens


def cpu_benchmark(batches: list[int], prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """jaxagent vs transformers generate on the CPU, per batch size."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        n_params = build_model(folder, CPU_MODEL)
        rng = np.random.default_rng(0)
        report = {"benchmark": "sampler", "device": platform.processor() or platform.machine(),
                  "jax_backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
                  "params_millions": round(n_params / 1e6, 1), "prompt_len": prompt_len, "new_tokens": new_tokens,
                  "repeats": repeats, "results": []}
        for batch in batches:
            prompts = rng.integers(0, CPU_MODEL["vocab_size"], (batch, prompt_len))
            j_first, j_times, j_tokens, compiles = jaxagent_side(folder, prompts, new_tokens, repeats)
            t_first, t_times, t_tokens = torch_side(folder, prompts, new_tokens, repeats)
            j_tps = batch * new_tokens / statistics.median(j_times)
            t_tps = batch * new_tokens / statistics.median(t_times)
            report["results"].append({
                "batch": batch, "jaxagent_tokens_per_s": round(j_tps, 1), "hf_tokens_per_s": round(t_tps, 1),
                "ratio": round(j_tps / t_tps, 2), "jaxagent_compile_s": round(j_first - statistics.median(j_times), 2),
                "jaxagent_compilations": compiles, "greedy_tokens_identical": j_tokens == t_tokens,
            })
    return report


def gpu_benchmark(batches: list[int], prompt_len: int, new_tokens: int, repeats: int, bandwidth_gbs: float) -> dict:
    """jaxagent alone on an accelerator, bf16, against the HBM roofline of decoding."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        n_params = build_model(folder, GPU_MODEL, dtype="bfloat16")
        rng = np.random.default_rng(0)
        shape = GPU_MODEL
        head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        kv_bytes_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * 2
        weight_bytes = 2 * n_params
        report = {"benchmark": "sampler_gpu", "device": str(jax.devices()[0].device_kind), "dtype": "bfloat16",
                  "params_millions": round(n_params / 1e6, 1), "prompt_len": prompt_len, "new_tokens": new_tokens,
                  "bandwidth_GBps": bandwidth_gbs, "results": []}
        for batch in batches:
            prompts = rng.integers(0, shape["vocab_size"], (batch, prompt_len))
            first, times, _, compiles = jaxagent_side(folder, prompts, new_tokens, repeats, dtype="bfloat16")
            tps = batch * new_tokens / statistics.median(times)
            mean_context = prompt_len + new_tokens / 2
            roofline = batch * bandwidth_gbs * 1e9 / (weight_bytes + batch * mean_context * kv_bytes_per_token)
            report["results"].append({"batch": batch, "tokens_per_s": round(tps, 1),
                                      "roofline_tokens_per_s": round(roofline, 1),
                                      "fraction_of_roofline": round(tps / roofline, 3),
                                      "compile_s": round(first - statistics.median(times), 2),
                                      "compilations": compiles})
    return report


def main() -> None:
    """Command-line entry point: prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="1.5B bf16 model on the accelerator vs the roofline")
    parser.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="HBM bandwidth for the roofline")
    args = parser.parse_args()
    if args.gpu:
        report = gpu_benchmark(args.batches or [1, 64], args.prompt_len, args.new_tokens, args.repeats,
                               args.bandwidth_gbs)
    else:
        report = cpu_benchmark(args.batches or [1, 16], args.prompt_len, args.new_tokens, args.repeats)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
