"""LOOP update throughput against the same computation in PyTorch, and LOOP vs SFT peak memory.

    python -m benchmarks.update [--batch 4] [--length 512] [--repeats 3]

One full-parameter LOOP update (forward, backward, global-norm clip, AdamW) of a random ~55M-parameter
Qwen2-architecture model on a batch of `batch` x `length` tokens, float32, timed after a warm-up; next to it, in the
same run, transformers' PyTorch model with the same loss written in torch and torch's AdamW. Prints one JSON line:
tokens/s of each side and their ratio, model-FLOP utilisation against the 190 GFLOP/s this CPU's matmul reaches
(GUIDE) and against a 2048² float32 matmul measured in this run, compile time apart, and XLA's planned peak memory of
the LOOP update next to an SFT update on the same batch.

Model FLOPs per step: 6 x (matmul parameters) x tokens + 12 x layers x length² x hidden x batch (attention,
forward and backward, causal half not subtracted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.sampler import CPU_MODEL, build_model
from jaxagent.models.hf import load_hf_params
from jaxagent.update import (
    LossConfig,
    OptimConfig,
    SequenceBatch,
    UpdateConfig,
    init_train_state,
    make_update_step,
    sequence_logprobs,
)

GUIDE_MATMUL_GFLOPS = 190.0
OPTIM = OptimConfig(lr=5e-5, weight_decay=0.01, max_grad_norm=1.0)


def make_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens; model tokens in three turns per row; LOOP advantages; old log-probs filled in later."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, length), np.int32)
    turn = np.zeros((batch, length), np.int32)
    for k, start in enumerate(range(length // 8, length, length // 3)):
        mask[:, start:start + length // 6] = 1
        turn[:, start:start + length // 6] = k
    return {"tokens": rng.integers(0, vocab, (batch, length)), "mask": mask, "turn": turn,
            "advantages": rng.normal(0, 0.5, batch).astype(np.float32)}


def matmul_gflops() -> float:
    """Throughput of a jitted float32 2048² matmul on this machine, now."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def model_flops(config, tokens: int, batch: int, length: int) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    matmul_params = config.num_params - config.vocab_size * config.hidden_size  # the embedding lookup is no matmul
    if config.tie_word_embeddings:
        matmul_params += config.vocab_size * config.hidden_size  # ... but the tied head is
    attention = 12 * config.num_layers * length**2 * config.num_heads * config.head_dim * batch
    return 6 * matmul_params * tokens + attention


def jax_side(folder: Path, data: dict, repeats: int) -> dict:
    config, params = load_hf_params(folder)
    tokens = jnp.asarray(data["tokens"], jnp.int32)
    segments = jnp.ones_like(tokens)
    old, _ = sequence_logprobs(params, config, tokens, segments, None, None, 1.0, 512)
    old = old - 0.01  # ratios slightly away from 1, as on a second epoch
    batch = SequenceBatch(tokens, segments, jnp.asarray(data["mask"]), jnp.asarray(data["turn"]), old, old,
                          jnp.asarray(data["advantages"]), jnp.ones(tokens.shape[0], jnp.float32))
    results = {}
    for name, loss in (("loop", LossConfig()), ("sft", LossConfig(kind="sft"))):
        update = make_update_step(config, UpdateConfig(loss=loss, optim=OPTIM))
        state = init_train_state(jax.tree.map(jnp.copy, {"params": params}), UpdateConfig(optim=OPTIM))
        compiled = update.step.lower(state, {}, batch, jax.random.key(0)).compile()
        memory = compiled.memory_analysis()
        results[name] = {"temp_bytes": int(memory.temp_size_in_bytes),
                         "peak_bytes": int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                           + memory.output_size_in_bytes - memory.alias_size_in_bytes)}
        if name != "loop":
            continue
        start = time.perf_counter()
        state, metrics = update(state, {}, batch, jax.random.key(0))
        jax.block_until_ready(state)
        first = time.perf_counter() - start
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            state, metrics = update(state, {}, batch, jax.random.key(i + 1))
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        results[name].update(step_s=statistics.median(times), first_s=first, loss=float(metrics["loss"]))
    return {"config": config, **results}


def torch_side(folder: Path, data: dict, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr, weight_decay=OPTIM.weight_decay,
                                  betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps)
    tokens = torch.from_numpy(data["tokens"].astype(np.int64))
    mask = torch.from_numpy(data["mask"][:, 1:].astype(np.float32))
    advantages = torch.from_numpy(data["advantages"])
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1]
        old = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0] - 0.01
    low, high = 1 / 1.1, 1.1

    def step() -> float:
        logits = model(input_ids=tokens).logits[:, :-1]
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
        ratio = torch.exp(logp - old)
        adv = advantages[:, None]
        objective = torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)
        loss = -((objective * mask).sum(1) / mask.sum(1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "first_s": first}


def main() -> None:
    """Command-line entry point: prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        n_params = build_model(folder, CPU_MODEL)
        data = make_batch(args.batch, args.length, CPU_MODEL["vocab_size"])
        ours = jax_side(folder, data, args.repeats)
        theirs = torch_side(folder, data, args.repeats)
    ceiling = matmul_gflops()
    tokens = args.batch * args.length
    flops = model_flops(ours["config"], tokens, args.batch, args.length)
    loop = ours["loop"]
    achieved = flops / loop["step_s"] / 1e9
    print(json.dumps({
        "benchmark": "update", "params_millions": round(n_params / 1e6, 1), "batch": args.batch,
        "length": args.length, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "jaxagent_tokens_per_s": round(tokens / loop["step_s"], 1),
        "torch_tokens_per_s": round(tokens / theirs["step_s"], 1),
        "ratio": round(theirs["step_s"] / loop["step_s"], 2),
        "model_gflop_per_step": round(flops / 1e9, 1), "achieved_gflops": round(achieved, 1),
        "mfu_vs_190_gflops": round(achieved / GUIDE_MATMUL_GFLOPS, 3),
        "matmul_2048_gflops_measured": round(ceiling, 1), "mfu_vs_measured_matmul": round(achieved / ceiling, 3),
        "jaxagent_compile_s": round(loop["first_s"] - loop["step_s"], 1),
        "loop_peak_bytes": loop["peak_bytes"], "sft_peak_bytes": ours["sft"]["peak_bytes"],
        "loop_over_sft_peak_memory": round(loop["peak_bytes"] / ours["sft"]["peak_bytes"], 3),
        "loop_temp_bytes": loop["temp_bytes"], "sft_temp_bytes": ours["sft"]["temp_bytes"],
    }))


if __name__ == "__main__":
    main()
