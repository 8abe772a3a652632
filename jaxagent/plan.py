"""Will a run fit? `python -m jaxagent.plan --config NAME [key=value ...] --devices N --device-memory GB`

For the config's real model shapes (its Hugging Face `config.json`, or the built-in shapes named by `model.shapes`
when no weights are present) the planner lowers and compiles, on N simulated CPU devices and with abstract arrays
(nothing is allocated), the two programs that hold a device's memory:

- the **update step** of the run's RL stage (or SFT), on the config's mesh with the training rules: one minibatch of
  `max_context`-token rows, micro-batched as configured;
- a **decode step** of the sampler over a KV cache of `rollout.max_concurrent` rows × `max_context` slots, on one
  host's devices with the sampling rules (each host samples its own episodes).

It prints, per device: parameters, LoRA adapters, optimizer state, the KV cache, each program's activation peak
(XLA's memory analysis of the compiled program), the total of each phase and whether it fits in the device's memory;
then the largest micro-batch and concurrent-episode count that fit. It exits 1 when the plan does not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Sequence

from jaxagent.errors import UserError, run_main

GIB = 2**30

# config.json fields of the models the paper configs name, for planning without the weights.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "qwen2.5-32b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
                    "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
                    "num_key_value_heads": 8, "vocab_size": 152064, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
                    "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "llama3.1-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                    "max_position_embeddings": 131072, "tie_word_embeddings": False,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}


class PlanError(UserError):
    """A plan that cannot be made (no model shapes, a mesh that does not fit the device count)."""


@dataclasses.dataclass
class Phase:
    """One phase's bytes per device, by what holds them."""

    name: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxagent.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a name in configs/ or a .yaml path")
    parser.add_argument("overrides", nargs="*", help="key=value settings, as for jaxagent.train")
    parser.add_argument("--devices", type=int, required=True, help="devices in the whole job")
    parser.add_argument("--device-memory", type=float, required=True, help="GB (GiB) of memory per device")
    parser.add_argument("--devices-per-host", type=int, default=8, help="devices one process drives [8]")
    parser.add_argument("--backend", choices=("cpu", "local"), default="cpu",
                        help="cpu: N simulated CPU devices (XLA:CPU computes bf16 in f32, so its activation figures "
                             "run high); local: compile for this machine's own N devices (e.g. one GPU) [cpu]")
    parser.add_argument("--json", action="store_true", help="also print the plan as one JSON line")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.device_memory <= 0 or args.devices_per_host < 1:
        raise PlanError(f"--devices={args.devices}, --device-memory={args.device_memory} and --devices-per-host="
                        f"{args.devices_per_host} must be positive")
    if args.backend == "cpu":
        _simulate_devices(args.devices)
    else:
        import jax

        if jax.device_count() != args.devices:
            raise PlanError(f"--backend local compiles for this machine's {jax.device_count()} device(s); "
                            f"--devices={args.devices} differs (use --backend cpu to simulate {args.devices})")
    from jaxagent import compiling
    from jaxagent.config import load_config

    compiling.collect_garbage_less_often()  # planning is mostly tracing the update and decode steps
    config = load_config(args.config, args.overrides)
    report = plan(config, args.devices, args.device_memory * GIB, min(args.devices_per_host, args.devices))
    if args.json:
        print(json.dumps(report))
    return 0 if report["fits"] else 1


def _simulate_devices(count: int) -> None:
    """N CPU devices for lowering (set before JAX starts its backends)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


def model_shapes(config) -> Any:
    """The ModelConfig of the run's policy with its compute settings: from the model folder, or `model.shapes`."""
    from jaxagent.config import model_folder
    from jaxagent.models.config import ModelConfig

    section = config.model
    compute = section.compute
    if section.from_scratch:
        raise PlanError("the planner is for pretrained models (model.path / model.path_env); a model from scratch "
                        "is small enough to try")
    try:
        return ModelConfig.from_hf_dir(model_folder(section), **compute)
    except UserError:
        if not section.shapes:
            raise PlanError(f"no model folder ({section.path or '$' + section.path_env} not set or absent) and no "
                            f"model.shapes; set model.shapes to one of: {', '.join(KNOWN_SHAPES)}") from None
    if section.shapes not in KNOWN_SHAPES:
        raise PlanError(f"model.shapes={section.shapes!r}; built-in shapes: {', '.join(KNOWN_SHAPES)}")
    return ModelConfig.from_hf_dict(KNOWN_SHAPES[section.shapes], source=f"model.shapes={section.shapes}", **compute)


def plan(config, devices: int, device_bytes: float, per_host: int) -> dict:
    """Print the plan of `config` on `devices` devices of `device_bytes` each; returns it as plain data (with
    `fits`)."""
    import jax

    from jaxagent.config import shared_fields
    from jaxagent.models.config import dtype_name
    from jaxagent.models.lora import LoraConfig
    from jaxagent.sharding import MeshConfig, make_mesh

    model = model_shapes(config)
    lora = LoraConfig(**shared_fields(config.lora, LoraConfig)) if config.lora.enabled else None
    train_mesh = make_mesh(MeshConfig(**shared_fields(config.mesh, MeshConfig)), jax.devices()) if devices > 1 else None
    tensor = train_mesh.shape["tensor"] if train_mesh is not None else 1
    if per_host % tensor:
        raise PlanError(f"mesh.tensor={tensor} does not divide --devices-per-host={per_host}")
    sample_mesh = (make_mesh(MeshConfig(data=-1, fsdp=1, tensor=tensor), jax.devices()[:per_host])
                   if per_host > 1 else None)
    rows, micro = _minibatch(config)
    print(f"plan: {config.name}, {model.family} {model.num_params / 1e9:.1f}B parameters "
          f"({dtype_name(model.param_dtype)}), "
          f"{'LoRA r' + str(lora.rank) if lora else 'every parameter trained'}; {devices} device(s) of "
          f"{device_bytes / GIB:.0f} GiB, {_mesh_text(train_mesh)}; sampling on {per_host} per host")
    update, (micro_rows, peak, growth) = _update_phase(config, model, lora, train_mesh, rows, micro)
    concurrent = config.rollout.max_concurrent
    sample, capacity = _sample_phase(config, model, lora, train_mesh, sample_mesh, concurrent, update)
    phases = [update, sample]
    print(_table(phases, device_bytes))
    fits = all(phase.total <= device_bytes for phase in phases)
    # Activations grow about linearly with the rows of a micro-batch; the KV cache exactly with the episodes.
    parallel = 1 if train_mesh is None else train_mesh.shape["data"] * train_mesh.shape["fsdp"]
    best_micro = micro_rows + int((device_bytes - update.total) // growth) * parallel
    per_episode = capacity["per_episode"]
    print(f"micro-batch: {micro_rows} row(s) of {config.rollout.max_context} tokens configured; up to "
          f"~{max(best_micro, 0)} fit (activations grow {growth / GIB:.2f} GiB per row per device)")
    if capacity["budget"]:
        best_concurrent = concurrent if fits else 0
        (whole, length), *wide = capacity["shapes"]
        shortest = f"; all {concurrent} while each holds up to {wide[0][1]} tokens" if wide else ""
        print(f"concurrent episodes per host: {concurrent} configured under a KV budget of "
              f"{capacity['budget'] / GIB:g} GiB per device: {min(whole, concurrent)} at {length} tokens each"
              f"{shortest}; the latest admitted wait (parked) while longer ones need the room")
    else:
        free_for_kv = device_bytes - (sample.total - sample.parts["KV cache"])
        best_concurrent = max(int(free_for_kv // per_episode), 0)
        print(f"concurrent episodes per host: {concurrent} configured; up to ~{best_concurrent} fit "
              f"({per_episode / GIB:.3f} GiB of KV cache per whole-context episode on each device)")
    print("fits" if fits else "does NOT fit")
    return {"config": config.name, "model": f"{model.family} {model.num_params / 1e9:.1f}B",
            "lora_rank": lora.rank if lora else None, "devices": devices, "device_memory_gib": device_bytes / GIB,
            "backend": jax.devices()[0].device_kind, "mesh": dict(train_mesh.shape) if train_mesh else None,
            "max_context": config.rollout.max_context,
            "phase_bytes": {phase.name: {**phase.parts, "total": phase.total} for phase in phases},
            "micro_batch_rows": micro_rows, "largest_micro_batch_rows": max(best_micro, 0),
            "concurrent_episodes": concurrent, "largest_concurrent_episodes": best_concurrent,
            "kv_budget_gib": capacity["budget"] / GIB, "decode_shapes": capacity["shapes"], "fits": fits}


def _on(tree, shardings):
    """Abstract arrays like `tree`'s, placed by `shardings` (a tree of the same structure)."""
    import jax

    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings)


def _mesh_text(mesh) -> str:
    return "no mesh" if mesh is None else "mesh " + ", ".join(f"{k}={v}" for k, v in mesh.shape.items())


def _minibatch(config) -> tuple[int, int]:
    """(rows per update step, micro-batches) of the run's RL stage, or of SFT when it has none."""
    from jaxagent.config import RL_STAGES

    if any(stage in RL_STAGES for stage in config.stages):
        return config.loop.minibatch_size, config.loop.micro_batches
    return config.sft.batch_size, 1


def _update_phase(config, model, lora, mesh, rows: int, micro: int) -> tuple[Phase, tuple[int, int, int]]:
    """Bytes per device while the update step runs, and (rows per micro-batch, activation peak, peak growth per
    row) from compiling it at the configured micro-batch and at one row more."""
    rows_per_micro = rows // micro
    compiled, arguments = _compiled_update(config, model, lora, mesh, rows, micro)
    peak = compiled.memory_analysis().temp_size_in_bytes
    # One more row on every data-parallel device (a step that keeps the batch split evenly).
    parallel = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    bigger, _ = _compiled_update(config, model, lora, mesh, (rows_per_micro + parallel) * micro, micro)
    growth = max(bigger.memory_analysis().temp_size_in_bytes - peak, 1)
    parts = {name: _device_bytes(tree) for name, tree in arguments.items()}
    parts["activations (update)"] = peak
    return Phase("update step", parts), (rows_per_micro, peak, growth)


def _compiled_update(config, model, lora, mesh, rows: int, micro: int):
    """The compiled update step for `rows` rows of `max_context` tokens, and its abstract arguments by kind."""
    import jax
    import jax.numpy as jnp

    from jaxagent.algorithms.loop import loss_config
    from jaxagent.algorithms.sft import update_config as sft_update_config
    from jaxagent.config import RL_STAGES
    from jaxagent.models.transformer import abstract_params
    from jaxagent.sharding import TRAIN_RULES, param_shardings
    from jaxagent.trajectory import SequenceBatch
    from jaxagent.update import (
        StepShardings,
        UpdateConfig,
        batch_shardings,
        init_train_state,
        make_update_step,
        train_state_shardings,
    )

    rl = [stage for stage in config.stages if stage in RL_STAGES]
    if rl:
        update_config = UpdateConfig(loss_config(rl[0], config.loop, 1, config.rollout.temperature), config.optim,
                                     micro_batches=micro)
    else:
        update_config = dataclasses.replace(sft_update_config(config.sft), micro_batches=micro)
    params, adapters = abstract_params(model, lora)
    trainable = {"lora": adapters} if lora else {"params": params}
    frozen = {"params": params} if lora else {}
    state = jax.eval_shape(lambda t: init_train_state(t, update_config), trainable)
    length = config.rollout.max_context
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    floats = jax.ShapeDtypeStruct((rows, length), jnp.float32)
    batch = SequenceBatch(tokens, tokens, tokens, tokens, floats, floats, jax.ShapeDtypeStruct((rows,), jnp.float32),
                          jax.ShapeDtypeStruct((rows,), jnp.float32))
    if mesh is not None:
        shardings = StepShardings(train_state_shardings(state, model, mesh, update_config, lora),
                                  {"params": param_shardings(model, mesh, TRAIN_RULES)[0]} if frozen else {})
        state, frozen = _on(state, shardings.state), _on(frozen, shardings.frozen)
        batch = _on(batch, batch_shardings(batch, mesh))
    else:
        shardings = None
    step = make_update_step(model, update_config, lora, shardings=shardings)
    compiled = step.step.lower(state, frozen, batch, jax.random.key(0)).compile()
    arguments = {"parameters": frozen if lora else state.trainable, "LoRA adapters": state.trainable if lora else {},
                 "optimizer state": state.opt_state}
    return compiled, arguments


def _sample_phase(config, model, lora, train_mesh, sample_mesh, concurrent: int, update: Phase
                  ) -> tuple[Phase, dict]:
    """Bytes per device while a host decodes its episodes (the sampler's own decode program), and the episode
    capacity. Without a KV budget the cache holds `concurrent` rows of `max_context` slots; with one
    (`rollout.kv_cache_gb`) the two extreme caches the budget allows are compiled: every configured episode at the
    longest length that fits, and as many whole-context episodes as fit."""
    from jaxagent.sampling import Sampler

    length = config.rollout.max_context
    sampler = Sampler(model, max_len=length, lora=lora, mesh=sample_mesh)
    budget = int(config.rollout.kv_cache_gb * GIB)
    shapes = [(concurrent, length)] if not budget else _budget_shapes(sampler, budget, concurrent, length)
    programs = [_compiled_decode(config, model, lora, sampler, sample_mesh, rows, slots) for rows, slots in shapes]
    parts = {name: value for name, value in update.parts.items() if name != "activations (update)"}
    if train_mesh is not None and train_mesh.shape["fsdp"] > 1:  # the sampler's copy, whole across fsdp
        parts["sampling copy of the weights"] = programs[0][2]
    parts["KV cache"] = max(cache for _, cache, _ in programs)
    parts["activations (decode)"] = max(compiled.memory_analysis().temp_size_in_bytes for compiled, _, _ in programs)
    per_episode = sampler.cache_bytes(1, length) * (sample_mesh.shape["data"] if sample_mesh is not None else 1)
    capacity = {"budget": budget, "shapes": shapes, "per_episode": per_episode}
    return Phase("decoding", parts), capacity


def _budget_shapes(sampler, budget: int, concurrent: int, length: int) -> list[tuple[int, int]]:
    """(rows, slots) of the largest caches a KV budget allows: all `concurrent` rows at the longest length bucket
    that fits, and the most whole-context rows that fit."""
    buckets = [b for b in sampler.batch_buckets if sampler.cache_bytes(b, length) <= budget]
    if not buckets:
        raise PlanError(f"rollout.kv_cache_gb={budget / GIB:g} cannot hold one episode of {length} tokens "
                        f"({sampler.cache_bytes(1, length) / GIB:.3f} GiB per device)")
    shapes = [(min(max(buckets), concurrent), length)]
    lengths = [s for s in sampler.length_buckets if s < length and sampler.cache_bytes(concurrent, s) <= budget]
    if max(buckets) < concurrent and lengths:
        shapes.append((concurrent, max(lengths)))
    return shapes


def _compiled_decode(config, model, lora, sampler, sample_mesh, rows: int, length: int):
    """(compiled decode program, KV-cache bytes per device, weight bytes per device) for a cache of `rows` rows of
    `length` slots on one host's devices."""
    import jax
    import jax.numpy as jnp

    from jaxagent.buckets import round_up
    from jaxagent.models.transformer import KVCache, abstract_params
    from jaxagent.sampling import SamplerState, SamplingParams, _Progress
    from jaxagent.sharding import CACHE_AXES, SAMPLE_RULES, param_shardings, sharding_for

    rows = round_up(rows, sampler.batch_buckets, "batch size")
    params, adapters = abstract_params(model, lora)
    kv = (model.num_layers, rows, model.num_kv_heads, length, model.head_dim)
    state = SamplerState(KVCache(jax.ShapeDtypeStruct(kv, model.dtype), jax.ShapeDtypeStruct(kv, model.dtype),
                                 jax.ShapeDtypeStruct((rows, length), jnp.int32),
                                 jax.ShapeDtypeStruct((rows,), jnp.int32)),
                         jax.ShapeDtypeStruct((rows,), jnp.int32),
                         jax.ShapeDtypeStruct((rows, model.vocab_size), jnp.float32))
    if sample_mesh is not None:
        params_sh, adapters_sh = param_shardings(model, sample_mesh, SAMPLE_RULES, lora)
        params, adapters = _on(params, params_sh), _on(adapters, adapters_sh)
        axes = (*CACHE_AXES, ("batch",), ("batch", "vocab"))
        leaves = (*state.cache, state.next_position_B, state.last_logits_BxV)
        placed = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(a, x.shape, sample_mesh, SAMPLE_RULES))
                  for a, x in zip(axes, leaves)]
        state = SamplerState(KVCache(*placed[:4]), placed[4], placed[5])
    stops = sampler._stop_arrays(SamplingParams(stop_token_ids=(0,)))
    stop_width = (stops[1].shape[1], stops[2].shape[1])
    vector = lambda dtype: jax.ShapeDtypeStruct((rows,), dtype)  # noqa: E731
    progress = _Progress(vector(jnp.int32), vector(jnp.bool_), vector(jnp.int32),
                         jax.ShapeDtypeStruct((rows, stop_width[0]), jnp.int32),
                         jax.ShapeDtypeStruct((rows, stop_width[1]), jnp.int32), jax.random.key(0))
    compiled = sampler._decode.lower(
        params, state, vector(jnp.int32), vector(jnp.bool_), progress, jnp.int32(1), jnp.float32(1.0),
        jnp.float32(1.0), *stops, adapters or None, kv_limit=length, buffer=config.rollout.decode_chunk, top_k=0,
        greedy=False, use_top_p=False).compile()
    return compiled, _device_bytes(state.cache), _device_bytes(params) + _device_bytes(adapters)


def _device_bytes(tree) -> int:
    """Bytes one device holds of `tree` (abstract arrays; the most loaded device's shard of each)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _table(phases: list[Phase], device_bytes: float) -> str:
    names = list(dict.fromkeys(name for phase in phases for name in phase.parts))
    width = max(len(n) for n in names + ["total"]) + 2
    lines = [f"{'per device (GiB)':<{width}}" + "".join(f"{phase.name:>16}" for phase in phases)]
    for name in names:
        lines.append(f"{name:<{width}}" + "".join(
            f"{phase.parts[name] / GIB:>16.2f}" if name in phase.parts else f"{'-':>16}" for phase in phases))
    lines.append(f"{'total':<{width}}" + "".join(f"{phase.total / GIB:>16.2f}" for phase in phases))
    lines.append(f"{'fits in ' + format(device_bytes / GIB, '.0f') + ' GiB':<{width}}" + "".join(
        f"{'yes' if phase.total <= device_bytes else 'NO':>16}" for phase in phases))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_main(main))
