"""Run by test_sharding.py in a subprocess with 8 simulated CPU devices: forward and sampling (`forward`), or the
LoRA update (`update`), on several meshes must equal the single-device results. Prints one JSON line.

    python tests/mesh_worker.py MODEL_FOLDER forward|update
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxagent.models import forward  # noqa: E402
from jaxagent.models.hf import load_hf_params  # noqa: E402
from jaxagent.sampling import Sampler, SamplingParams  # noqa: E402
from jaxagent.sharding import (  # noqa: E402
    SAMPLE_RULES,
    TRAIN_RULES,
    leaf_sharding_fn,
    make_mesh,
    param_shardings,
    sharding_for,
)

reads: list[int] = []  # bytes each checkpoint reader was asked for, noted when it closes


def _count_reads() -> None:
    from jaxagent.models import hf

    close = hf._TensorReader.close

    def counted(self) -> None:
        reads.append(self.bytes_read)
        close(self)
    hf._TensorReader.close = counted


def main(folder: str, part: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    _count_reads()
    config, params = load_hf_params(folder)
    if part == "update":
        print(json.dumps(update_under_meshes(config, params)))
        return
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (4, 16))
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 12, 3, 8)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=10)

    def run(p, mesh=None):
        logits = forward(p, config, jnp.asarray(ids), segment_ids_BxT=jnp.asarray(mask)).logits_BxTxV
        sampler = Sampler(config, max_len=64, mesh=mesh)
        _, g = sampler.generate(sample_params(mesh) if mesh else p, sampler.start(sample_params(mesh) if mesh else p,
                                                                                   prompts), greedy, jax.random.key(0))
        _, s = sampler.generate(sample_params(mesh) if mesh else p, sampler.start(sample_params(mesh) if mesh else p,
                                                                                   prompts), sampled, jax.random.key(1))
        return np.asarray(logits), g, s

    def sample_params(mesh):
        shardings, _ = param_shardings(config, mesh, SAMPLE_RULES)
        return jax.device_put(params, shardings)

    ref_logits, ref_greedy, ref_sampled = run(params)
    results = {}
    for name, shape in {"data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp8": {"data": 1, "fsdp": 8,
                                                                                              "tensor": 1}}.items():
        mesh = make_mesh(shape)
        train_shardings, _ = param_shardings(config, mesh, TRAIN_RULES)
        # Loaded straight into the shardings, not copied onto one device first, each device's block read alone.
        reads.clear()
        _, sharded = load_hf_params(folder, shardings=leaf_sharding_fn(train_shardings))
        file_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
        q_kernel = sharded["layers"]["attn"]["q"]["kernel"]
        batch_sharding = sharding_for(("batch", "length"), ids.shape, mesh, TRAIN_RULES)
        logits = forward(sharded, config, jax.device_put(jnp.asarray(ids), batch_sharding),
                         segment_ids_BxT=jax.device_put(jnp.asarray(mask), batch_sharding)).logits_BxTxV
        _, logits_greedy, logits_sampled = run(sharded, mesh)
        real = mask.astype(bool)
        results[name] = {
            "bytes_read_over_model": max(reads) / file_bytes,
            "q_kernel_spec": str(q_kernel.sharding.spec),
            "q_kernel_devices": len(q_kernel.sharding.device_set),
            "forward_max_diff": float(np.abs(np.asarray(logits) - ref_logits)[real].max()),
            "greedy_equal": logits_greedy.tokens == ref_greedy.tokens,
            "sampled_equal": logits_sampled.tokens == ref_sampled.tokens,
            "sampled_logprob_max_diff": float(max(np.abs(a - b).max() for a, b in zip(logits_sampled.logprobs,
                                                                                       ref_sampled.logprobs))),
        }
    print(json.dumps(results))


def update_under_meshes(config, params) -> dict:
    """LoRA LOOP loss and gradient, then two steps: sharded over each mesh vs one device; parameters and their
    placement."""
    from jaxagent.models import LoraConfig, init_params
    from jaxagent.update import (  # noqa: I001
        SequenceBatch,
        StepShardings,
        UpdateConfig,
        batch_shardings,
        init_train_state,
        make_update_step,
        sequence_logprobs,
        train_state_shardings,
    )

    lora = LoraConfig(rank=4, alpha=8.0)
    _, lora_params = init_params(config, jax.random.key(3), lora)
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (8, 24)))
    segments = jnp.ones_like(tokens)
    mask = jnp.zeros_like(tokens).at[:, 8:20].set(1)
    logp, _ = sequence_logprobs(params, config, tokens, segments, None, None, 1.0, 8)
    batch = SequenceBatch(tokens, segments, mask, jnp.zeros_like(tokens), logp, logp - 0.02,
                          jnp.asarray(rng.normal(0, 1, 8), jnp.float32), jnp.ones(8))
    update_config = UpdateConfig(micro_batches=2)

    def run(mesh=None):
        state = init_train_state({"lora": jax.tree.map(jnp.copy, lora_params)}, update_config)
        frozen, data = {"params": params}, batch
        step = make_update_step(config, update_config, lora)
        if mesh is not None:
            shardings = StepShardings(train_state_shardings(state, config, mesh, update_config, lora),
                                      {"params": param_shardings(config, mesh, TRAIN_RULES)[0]})
            state, frozen = jax.device_put(state, shardings.state), jax.device_put(frozen, shardings.frozen)
            data = jax.device_put(batch, batch_shardings(batch, mesh))
            step = make_update_step(config, update_config, lora, shardings=shardings)
        # The loss and gradient themselves (Adam would normalise a uniform gradient-scale error away).
        loss, grads, _, _ = step.gradients(state.trainable, frozen, data, state.step, jax.random.key(9))
        for i in range(2):
            state, metrics = step(state, frozen, data, jax.random.key(i))
        return state, metrics, float(loss), grads

    reference, ref_metrics, ref_loss, ref_grads = run()
    grad_scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(ref_grads))
    out = {}
    for name, shape in {"data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
                        "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1}}.items():
        state, metrics, loss, grads = run(make_mesh(shape))
        a = state.trainable["lora"]["layers"]["mlp"]["up"]["a"]
        out[name] = {
            "gradient_loss_diff": abs(loss - ref_loss),
            "gradient_max_rel_diff": float(max(np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in zip(
                jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))) / grad_scale,
            "gradient_scale": grad_scale,
            "lora_max_diff": float(max(np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in zip(
                jax.tree.leaves(state.trainable), jax.tree.leaves(reference.trainable)))),
            "loss_diff": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
            "lora_a_spec": str(a.sharding.spec), "lora_a_devices": len(a.sharding.device_set),
        }
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
