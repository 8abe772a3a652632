"""Sampler throughput against transformers' `generate`, in the same run, on the same safetensors.

    python -m benchmarks.sampler [--batches 1 16] [--prompt-len 64] [--new-tokens 128] [--repeats 5] [--no-compile]

A random Qwen2-architecture model of about 55M parameters is saved once; every side loads it and decodes greedily
from the same random prompts: jaxagent's sampler, and transformers' `generate` with its default dynamic cache, with
its static cache, and with the static cache and a `torch.compile`d forward (where it compiles; its error is
reported otherwise). Each side is warmed up (compilation reported apart), then the sides run interleaved, one
whole call (prefill + decode) each per repetition. Prints one JSON line: the machine, and per batch size every
side's tokens/s (min / median / max), jaxagent's ratio to each and to the strongest, and whether every side's
greedy tokens were identical.

`--gpu` instead measures a ~1.5B-parameter Qwen2-shaped model in bf16 on the accelerator (jaxagent only) and
reports tokens/s as a fraction of the HBM roofline: bandwidth / (weight bytes + batch x context x KV bytes/token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.machine import machine
from jaxagent.models.hf import load_hf_params
from jaxagent.sampling import Sampler, SamplingParams

CPU_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
# --smoke: checks that a benchmark runs end to end in seconds (the test suite's use); its figures mean nothing.
SMOKE_MODEL = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
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


class JaxagentRun:
    """A `run()` that decodes greedily with jaxagent's sampler (prefill + decode, whole call)."""

    def __init__(self, folder: Path, prompts: np.ndarray, new_tokens: int, dtype: str = "float32") -> None:
        self.config, self.params = load_hf_params(folder, param_dtype=dtype, dtype=dtype)
        self.sampler = Sampler(self.config, max_len=prompts.shape[1] + new_tokens)
        self.sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
        self.prompts = prompts.tolist()

    def __call__(self):
        batch, result = self.sampler.generate(self.params, self.sampler.start(self.params, self.prompts),
                                              self.sampling, jax.random.key(0))
        jax.block_until_ready(batch.state)
        return result.tokens


def hf_side(folder: Path, prompts: np.ndarray, new_tokens: int, cache: str, compiled: bool):
    """A `run()` that decodes with transformers' `generate` and the given cache (`dynamic` or `static`)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if compiled:
        model.forward = torch.compile(model.forward, dynamic=False)
    ids = torch.from_numpy(prompts.astype(np.int64))
    extra = {"cache_implementation": "static"} if cache == "static" else {}

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                                 eos_token_id=None, **extra)
        return out[:, prompts.shape[1]:].tolist()
    return run


def interleaved(runs: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Warm every side up (its first call, compilation included), then time `repeats` rounds of one call per side.
    Returns (first-call seconds, per-side call seconds, {"tokens", "errors"}); a side that fails records its error."""
    first, tokens, errors = {}, {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        try:
            tokens[name] = run()
        except Exception as err:  # noqa: BLE001 - e.g. torch.compile without a working toolchain
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            continue
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in tokens}
    for _ in range(repeats):
        for name in tokens:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return first, times, {"tokens": tokens, "errors": errors}


def spread(times: list[float], tokens: int) -> dict[str, float]:
    """Tokens/s at the slowest, median and fastest call."""
    return {"min": round(tokens / max(times), 1), "median": round(tokens / statistics.median(times), 1),
            "max": round(tokens / min(times), 1)}


def cpu_benchmark(batches: list[int], prompt_len: int, new_tokens: int, repeats: int, compile_hf: bool,
                  shape: dict = CPU_MODEL) -> dict:
    """jaxagent vs transformers generate (dynamic cache, static cache, static + torch.compile), per batch size."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        n_params = build_model(folder, shape)
        rng = np.random.default_rng(0)
        report = {"benchmark": "sampler", **machine(), "jax_backend": jax.default_backend(),
                  "params_millions": round(n_params / 1e6, 1), "prompt_len": prompt_len, "new_tokens": new_tokens,
                  "repeats": repeats, "results": []}
        for batch in batches:
            prompts = rng.integers(0, shape["vocab_size"], (batch, prompt_len))
            ours = JaxagentRun(folder, prompts, new_tokens)
            runs = {"jaxagent": ours, "hf_dynamic": hf_side(folder, prompts, new_tokens, "dynamic", False),
                    "hf_static": hf_side(folder, prompts, new_tokens, "static", False)}
            if compile_hf:
                runs["hf_static_compiled"] = hf_side(folder, prompts, new_tokens, "static", True)
            first, times, outputs = interleaved(runs, repeats)
            report["results"].append(batch_result(batch, new_tokens, first, times, outputs, ours))
    return report


def batch_result(batch: int, new_tokens: int, first: dict, times: dict, outputs: dict, ours: JaxagentRun) -> dict:
    """One batch size's figures: every side's spread, jaxagent's ratios, compile times, token identity."""
    medians = {name: statistics.median(t) for name, t in times.items()}
    baselines = [name for name in times if name != "jaxagent"]
    strongest = min(baselines, key=medians.get)
    return {
        "batch": batch, "tokens_per_s": {name: spread(t, batch * new_tokens) for name, t in times.items()},
        "ratio_vs": {name: round(medians[name] / medians["jaxagent"], 2) for name in baselines},
        "strongest_baseline": strongest, "ratio_vs_strongest": round(medians[strongest] / medians["jaxagent"], 2),
        "compile_s": {name: round(first[name] - medians[name], 2) for name in times},
        "jaxagent_compilations": ours.sampler.compile_count,
        "greedy_tokens_identical": all(t == outputs["tokens"]["jaxagent"] for t in outputs["tokens"].values()),
        "errors": outputs["errors"],
    }


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
        report = {"benchmark": "sampler_gpu", **machine(with_ceilings=False),
                  "device": str(jax.devices()[0].device_kind), "dtype": "bfloat16",
                  "params_millions": round(n_params / 1e6, 1), "prompt_len": prompt_len, "new_tokens": new_tokens,
                  "bandwidth_GBps": bandwidth_gbs, "results": []}
        for batch in batches:
            prompts = rng.integers(0, shape["vocab_size"], (batch, prompt_len))
            run = JaxagentRun(folder, prompts, new_tokens, dtype="bfloat16")
            first, times, _ = interleaved({"jaxagent": run}, repeats)
            first, times, compiles = first["jaxagent"], times["jaxagent"], run.sampler.compile_count
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip transformers with torch.compile")
    parser.add_argument("--gpu", action="store_true", help="1.5B bf16 model on the accelerator vs the roofline")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model: checks the run, figures mean nothing")
    parser.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="HBM bandwidth for the roofline")
    args = parser.parse_args()
    if args.gpu:
        report = gpu_benchmark(args.batches or [1, 64], args.prompt_len, args.new_tokens, args.repeats,
                               args.bandwidth_gbs)
    else:
        report = cpu_benchmark(args.batches or [1, 16], args.prompt_len, args.new_tokens, args.repeats,
                               not args.no_compile, SMOKE_MODEL if args.smoke else CPU_MODEL)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
