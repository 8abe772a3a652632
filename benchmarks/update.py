"""The LOOP update against the same computation in PyTorch (eager and `torch.compile`), and LOOP vs SFT peak memory.

    python -m benchmarks.update [--batch 4] [--length 512] [--repeats 5] [--lora-rank 16] [--no-compile]

One LOOP update (forward, backward, global-norm clip 1, AdamW lr 5e-5) of a random ~55M-parameter
Qwen2-architecture model on `batch` x `length` tokens, float32, in two settings: every parameter trained, and the
paper's LoRA (rank 16, alpha 32, on the seven attention and MLP projections) over a frozen base. The PyTorch side is
transformers' model with the same loss written in torch (and the same adapters, copied from jaxagent's, for LoRA),
with torch's AdamW, run eagerly and under `torch.compile`. The sides run interleaved (one step of each per
repetition, after a warm-up step that also yields each side's first loss), so a machine that slows down slows all
of them. Both sides compute the first step's loss from the same weights and batch; the benchmark fails unless they
agree to 1e-4 (relative).

Prints one JSON line: the CPU, both frameworks' 2048² float32 matmul throughput measured in this run, and per
setting the tokens/s of every side (min / median / max over the repetitions), jaxagent's ratio to each PyTorch side,
both first-step losses, model-FLOP utilisation against the measured matmuls, compile times (apart), and XLA's
planned peak memory of the LOOP update next to an SFT update on the same batch.

Model FLOPs per step: 6 x (matmul parameters) x tokens + 12 x layers x length² x hidden x batch (attention,
forward and backward, causal half not subtracted); with LoRA the frozen weights need no weight gradient, so 4 x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import machine
from benchmarks.sampler import CPU_MODEL, SMOKE_MODEL, build_model
from jaxagent.models.config import ModelConfig
from jaxagent.models.hf import load_hf_params
from jaxagent.models.lora import LoraConfig
from jaxagent.models.transformer import init_params
from jaxagent.update import (
    LossConfig,
    OptimConfig,
    SequenceBatch,
    UpdateConfig,
    init_train_state,
    make_update_step,
    sequence_logprobs,
)

OPTIM = OptimConfig(lr=5e-5, weight_decay=0.01, max_grad_norm=1.0)
EPSILON = 0.1
LOSS_AGREEMENT = 1e-4  # relative
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def make_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens; model tokens in three turns per row; LOOP advantages."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, length), np.int32)
    turn = np.zeros((batch, length), np.int32)
    for k, start in enumerate(range(length // 8, length, length // 3)):
        mask[:, start:start + length // 6] = 1
        turn[:, start:start + length // 6] = k
    return {"tokens": rng.integers(0, vocab, (batch, length)), "mask": mask, "turn": turn,
            "advantages": rng.normal(0, 0.5, batch).astype(np.float32)}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_flops(config: ModelConfig, batch: int, length: int, lora: bool) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    matmul_params = config.num_params - config.vocab_size * config.hidden_size  # the embedding lookup is no matmul
    if config.tie_word_embeddings:
        matmul_params += config.vocab_size * config.hidden_size  # ... but the tied head is
    attention = 12 * config.num_layers * length**2 * config.num_heads * config.head_dim * batch
    return (4 if lora else 6) * matmul_params * batch * length + attention


# ---- jaxagent -------------------------------------------------------------------------------------------------------

class JaxSide:
    """jaxagent's jitted update on the benchmark batch; `step()` runs one and returns its loss."""

    def __init__(self, folder: Path, data: dict, lora: LoraConfig | None, adapters: dict | None) -> None:
        self.config, params = load_hf_params(folder)
        tokens = jnp.asarray(data["tokens"], jnp.int32)
        segments = jnp.ones_like(tokens)
        logprobs = jax.jit(lambda p, a: sequence_logprobs(p, self.config, tokens, segments, a, lora, 1.0, 512)[0])
        old = logprobs(params, adapters)
        old = old - 0.01  # ratios slightly away from 1, as on a second epoch
        self.batch = SequenceBatch(tokens, segments, jnp.asarray(data["mask"]), jnp.asarray(data["turn"]), old, old,
                                   jnp.asarray(data["advantages"]), jnp.ones(tokens.shape[0], jnp.float32))
        trainable = {"lora": adapters} if lora is not None else {"params": params}
        self.frozen = {"params": params} if lora is not None else {}
        self.update_config = UpdateConfig(loss=LossConfig(epsilon=EPSILON), optim=OPTIM)
        self.update = make_update_step(self.config, self.update_config, lora)
        self.state = init_train_state(jax.tree.map(jnp.copy, trainable), self.update_config)
        self.lora, self.key = lora, 0

    def step(self) -> float:
        self.key += 1
        self.state, metrics = self.update(self.state, self.frozen, self.batch, jax.random.key(self.key))
        jax.block_until_ready(self.state)
        return float(metrics["loss"])

    def peak_bytes(self, kind: str) -> int:
        """XLA's planned peak memory of an update with loss `kind` on this batch."""
        config = UpdateConfig(loss=LossConfig(kind=kind), optim=OPTIM)
        update = make_update_step(self.config, config, self.lora)
        compiled = update.step.lower(self.state, self.frozen, self.batch, jax.random.key(0)).compile()
        memory = compiled.memory_analysis()
        return int(memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
                   - memory.alias_size_in_bytes)


# ---- PyTorch --------------------------------------------------------------------------------------------------------

def add_torch_lora(model, adapters: dict, lora: LoraConfig) -> list:
    """Wrap every targeted projection of the HF model with jaxagent's adapters (same values); returns them."""
    import torch

    class LoraLinear(torch.nn.Module):
        def __init__(self, base, a, b):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.from_numpy(np.array(a)))
            self.b = torch.nn.Parameter(torch.from_numpy(np.array(b)))

        def forward(self, x):
            return self.base(x) + lora.scale * ((x @ self.a) @ self.b)

    params = []
    for name, path in HF_NAMES.items():
        if name not in lora.targets:
            continue
        group = "attn" if path.startswith("self_attn") else "mlp"
        a_all, b_all = adapters["layers"][group][name]["a"], adapters["layers"][group][name]["b"]
        for i, layer in enumerate(model.model.layers):
            parent, attr = path.split(".")
            module = getattr(layer, parent)
            base = getattr(module, attr)
            a = np.asarray(a_all[i]).reshape(base.in_features, lora.rank)
            b = np.asarray(b_all[i]).reshape(lora.rank, base.out_features)
            wrapped = LoraLinear(base, a, b)
            setattr(module, attr, wrapped)
            params += [wrapped.a, wrapped.b]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


class TorchSide:
    """transformers' model, the same LOOP loss in torch, torch's AdamW; eager or under torch.compile."""

    def __init__(self, folder: Path, data: dict, lora: LoraConfig | None, adapters: dict | None,
                 compiled: bool) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        model.train()
        trained = add_torch_lora(model, adapters, lora) if lora is not None else list(model.parameters())
        self.trained = trained
        self.optimizer = torch.optim.AdamW(trained, lr=OPTIM.lr, weight_decay=OPTIM.weight_decay,
                                           betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps)
        self.tokens = torch.from_numpy(data["tokens"].astype(np.int64))
        self.mask = torch.from_numpy(data["mask"][:, 1:].astype(np.float32))
        self.advantages = torch.from_numpy(data["advantages"])
        with torch.no_grad():
            self.old = self._logprobs(model) - 0.01
        self.loss_fn = torch.compile(self._loss) if compiled else self._loss
        self.model = model

    def _logprobs(self, model):
        import torch

        logits = model(input_ids=self.tokens).logits[:, :-1]
        return torch.log_softmax(logits, -1).gather(-1, self.tokens[:, 1:, None])[..., 0]

    def _loss(self, model):
        import torch

        ratio = torch.exp(self._logprobs(model) - self.old)
        adv = self.advantages[:, None]
        objective = torch.minimum(ratio * adv, ratio.clamp(1 / (1 + EPSILON), 1 + EPSILON) * adv)
        # jaxagent's LossConfig default: the mean over trajectories of each one's mean over its model tokens.
        return -((objective * self.mask).sum(1) / self.mask.sum(1)).mean()

    def step(self) -> float:
        import torch

        loss = self.loss_fn(self.model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, OPTIM.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# ---- the run --------------------------------------------------------------------------------------------------------

def spread(times: list[float], tokens: int) -> dict[str, float]:
    """Tokens/s at the slowest, median and fastest repetition."""
    return {"min": round(tokens / max(times), 1), "median": round(tokens / statistics.median(times), 1),
            "max": round(tokens / min(times), 1)}


def run_setting(folder: Path, data: dict, lora: LoraConfig | None, repeats: int, compile_torch: bool,
                ceilings: dict) -> dict:
    """One setting (full or LoRA), every side interleaved; raises if the first-step losses disagree."""
    adapters = None
    if lora is not None:
        config = ModelConfig.from_hf_dir(folder)
        _, adapters = init_params(config, jax.random.key(1), lora)
        # B starts at zero; random values make the adapters matter to the loss both sides compare.
        leaves, tree = jax.tree.flatten(adapters)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        adapters = jax.tree.unflatten(tree, [x + 0.01 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    sides = {"jaxagent": JaxSide(folder, data, lora, adapters),
             "torch_eager": TorchSide(folder, data, lora, adapters, compiled=False)}
    if compile_torch:
        sides["torch_compile"] = TorchSide(folder, data, lora, adapters, compiled=True)
    first_loss, first_s = {}, {}
    for name, side in sides.items():  # warm-up: compilation, and the loss both sides must agree on
        start = time.perf_counter()
        first_loss[name] = side.step()
        first_s[name] = time.perf_counter() - start
    for name, loss in first_loss.items():
        if abs(loss - first_loss["jaxagent"]) > LOSS_AGREEMENT * abs(first_loss["jaxagent"]):
            raise SystemExit(f"first-step losses disagree: jaxagent {first_loss['jaxagent']!r} vs {name} {loss!r}")
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            times[name].append(timed(side.step))
    tokens = data["tokens"].size
    ours = sides["jaxagent"]
    achieved = model_flops(ours.config, *data["tokens"].shape, lora is not None) / statistics.median(
        times["jaxagent"]) / 1e9
    result = {
        "tokens_per_s": {name: spread(t, tokens) for name, t in times.items()},
        "ratio_vs": {name: round(statistics.median(times[name]) / statistics.median(times["jaxagent"]), 2)
                     for name in sides if name != "jaxagent"},
        "first_step_loss": {name: round(loss, 7) for name, loss in first_loss.items()},
        "losses_agree": True,
        "achieved_gflops": round(achieved, 1),
        "mfu_vs_xla_matmul": round(achieved / ceilings["xla"], 3),
        "mfu_vs_torch_matmul": round(achieved / ceilings["torch"], 3),
        "compile_s": {name: round(first_s[name] - statistics.median(times[name]), 1) for name in sides},
    }
    fastest = max(sides, key=lambda name: -statistics.median(times[name]))
    result["fastest"] = fastest
    if lora is None:
        loop, sft = ours.peak_bytes("policy"), ours.peak_bytes("sft")
        result.update(loop_peak_bytes=loop, sft_peak_bytes=sft, loop_over_sft_peak_memory=round(loop / sft, 3))
    return result


def main() -> None:
    """Command-line entry point: prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile side (minutes to compile)")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model: checks the run, figures mean nothing")
    args = parser.parse_args()
    shape = SMOKE_MODEL if args.smoke else CPU_MODEL
    report = {"benchmark": "update", **machine()}
    ceilings = report["matmul_2048_f32_gflops"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        n_params = build_model(folder, shape)
        data = make_batch(args.batch, args.length, shape["vocab_size"])
        settings = {"full": None, f"lora_r{args.lora_rank}": LoraConfig(rank=args.lora_rank,
                                                                        alpha=2.0 * args.lora_rank)}
        results = {name: run_setting(folder, data, lora, args.repeats, not args.no_compile, ceilings)
                   for name, lora in settings.items()}
    print(json.dumps({**report, "params_millions": round(n_params / 1e6, 1), "batch": args.batch,
                      "length": args.length, "repeats": args.repeats, **results}))


if __name__ == "__main__":
    main()
