"""Blockwise (flash) attention equals dense attention, and its training step's memory grows linearly with T."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxagent.models import ModelConfig, forward, init_cache, init_params
from jaxagent.models.attention import KeySource, blockwise_attention, dense_attention
from jaxagent.models.transformer import positions_from_segments
from jaxagent.update import LossConfig, SequenceBatch, UpdateConfig, init_train_state, make_update_step

B, K, G, D = 2, 2, 3, 8


def _segments(steps: int) -> np.ndarray:
    """Row 0: left padding then one sequence; row 1: two packed sequences then right padding."""
    segments = np.ones((B, steps), np.int32)
    segments[0, :5] = 0
    segments[1, steps // 2:] = 2
    segments[1, steps - 4:] = 0
    return segments


def _numpy_attention(q, keys, values, q_seg, q_ord, k_seg, k_ord, scale):
    """The formula, one query at a time: softmax over the keys it may see; zeros when it sees none."""
    out = np.zeros(q.shape, np.float64)
    for b in range(q.shape[0]):
        for t in range(q.shape[3]):
            seen = (k_seg[b] == q_seg[b, t]) & (k_seg[b] != 0) & (k_ord[b] <= q_ord[b, t])
            if not seen.any():
                continue
            for h in range(q.shape[1]):
                logits = keys[b, h][seen] @ q[b, h, :, t].T * scale  # [S_seen, G]
                weights = np.exp(logits - logits.max(axis=0))
                out[b, h, :, t] = (weights / weights.sum(axis=0)).T @ values[b, h][seen]
    return out


@pytest.mark.parametrize("blocks", [(8, 8), (16, 4), (64, 64)])
def test_blockwise_equals_dense_and_numpy_with_padding_and_packed_segments(blocks):
    steps, rng = 37, np.random.default_rng(0)
    q = rng.normal(size=(B, K, G, steps, D)).astype(np.float32)
    keys, values = (rng.normal(size=(B, K, steps, D)).astype(np.float32) for _ in range(2))
    segments, order = _segments(steps), np.broadcast_to(np.arange(steps), (B, steps))
    probe = rng.normal(size=q.shape).astype(np.float32)

    def loss(kernel, q, keys, values):
        out = kernel(q, [KeySource(keys, values, jnp.asarray(segments), jnp.asarray(order))], jnp.asarray(segments),
                     jnp.asarray(order), 0.3)
        return jnp.sum(out * probe), out

    blockwise = functools.partial(blockwise_attention, block_q=blocks[0], block_k=blocks[1])
    (_, dense_out), dense_grads = jax.value_and_grad(
        lambda *a: loss(dense_attention, *a), argnums=(0, 1, 2), has_aux=True)(q, keys, values)
    (_, block_out), block_grads = jax.value_and_grad(
        lambda *a: loss(blockwise, *a), argnums=(0, 1, 2), has_aux=True)(q, keys, values)
    reference = _numpy_attention(q, keys, values, segments, order, segments, order, 0.3)
    np.testing.assert_allclose(np.asarray(dense_out), reference, atol=1e-5)
    np.testing.assert_allclose(np.asarray(block_out), reference, atol=1e-5)
    for dense_grad, block_grad in zip(dense_grads, block_grads):
        np.testing.assert_allclose(np.asarray(block_grad), np.asarray(dense_grad), atol=1e-5)


TINY = ModelConfig(family="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, qkv_bias=True, attention_block=8)


def test_model_with_a_cache_gives_the_same_logits_with_either_kernel():
    """Prefill then multi-token appends over a cache (stale slots, padding): blockwise == dense == no cache."""
    dense = dataclasses.replace(TINY, attention="dense")
    params, _ = init_params(TINY, jax.random.key(0))
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, TINY.vocab_size, (B, 40))
    segments = _segments(40)
    full = {config.attention: np.asarray(forward(params, config, jnp.asarray(tokens), None,
                                                 jnp.asarray(segments)).logits_BxTxV) for config in (TINY, dense)}
    np.testing.assert_allclose(full["blockwise"], full["dense"], atol=1e-5)
    real, positions = segments != 0, np.asarray(positions_from_segments(jnp.asarray(segments)))
    for config in (TINY, dense):
        cache, pieces = init_cache(config, B, 64), []
        for start, stop in ((0, 13), (13, 14), (14, 40)):  # a prompt, one decode step, a long append
            out = forward(params, config, jnp.asarray(tokens[:, start:stop]), jnp.asarray(positions[:, start:stop]),
                          jnp.asarray(segments[:, start:stop]), cache, kv_limit=48)
            cache = out.cache
            pieces.append(np.asarray(out.logits_BxTxV))
        np.testing.assert_allclose(np.concatenate(pieces, axis=1)[real], full["dense"][real], atol=1e-5)


def _has_while_loop(fn, *args) -> bool:
    """Whether `fn`'s program walks key blocks (the blockwise kernel's while loop) rather than one dense block."""
    return "while[" in str(jax.make_jaxpr(fn)(*args))


def test_sampling_block_picks_the_kernel_over_the_cache_and_attention_block_the_one_for_training():
    """Training walks 8-token blocks; a decode step over a 32-slot cache is dense when `sampling_block` covers the
    cache and walks blocks when it falls back to `attention_block` (0). Either way the logits are the same."""
    trains_short = dataclasses.replace(TINY, attention_block=8, sampling_block=32)
    params, _ = init_params(TINY, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, TINY.vocab_size, (B, 20)), jnp.int32)

    def train_forward(config):
        return lambda p, t: forward(p, config, t).logits_BxTxV

    def decode_step(config):
        return lambda p, t, cache: forward(p, config, t[:, 19:], jnp.full((B, 1), 19), cache=cache,
                                           kv_limit=32).logits_BxTxV

    prompt = forward(params, TINY, tokens[:, :19], cache=init_cache(TINY, B, 32), kv_limit=32).cache
    assert _has_while_loop(train_forward(trains_short), params, tokens)
    assert not _has_while_loop(decode_step(trains_short), params, tokens, prompt)
    falls_back = dataclasses.replace(trains_short, sampling_block=0)
    assert _has_while_loop(decode_step(falls_back), params, tokens, prompt)
    dense_step = np.asarray(decode_step(trains_short)(params, tokens, prompt))
    np.testing.assert_allclose(dense_step, np.asarray(decode_step(falls_back)(params, tokens, prompt)), atol=1e-5)
    np.testing.assert_allclose(dense_step[:, 0], np.asarray(train_forward(trains_short)(params, tokens))[:, -1],
                               atol=1e-5)
    with pytest.raises(ValueError, match="sampling_block=-1"):
        dataclasses.replace(TINY, sampling_block=-1)


def _step_memory(attention: str, steps: int, remat: str = "none") -> int:
    """Bytes XLA's memory analysis gives the compiled SFT update step of a tiny model on one row of `steps` tokens."""
    config = dataclasses.replace(TINY, num_layers=1, attention=attention, attention_block=512, remat=remat)
    update = UpdateConfig(LossConfig(kind="sft"))
    step = make_update_step(config, update, donate=False)
    params = jax.eval_shape(lambda key: init_params(config, key)[0], jax.random.key(0))
    state = jax.eval_shape(lambda p: init_train_state({"params": p}, update), params)
    tokens = jax.ShapeDtypeStruct((1, steps), jnp.int32)
    per_token = jax.ShapeDtypeStruct((1, steps), jnp.float32)
    batch = SequenceBatch(tokens, tokens, tokens, tokens, per_token, per_token,
                          jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32))
    compiled = step.step.lower(state, {}, batch, jax.random.key(0)).compile()
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes


@pytest.mark.slow
def test_blockwise_training_step_memory_is_linear_in_the_sequence():
    blockwise = {steps: _step_memory("blockwise", steps) for steps in (4096, 16384, 32768)}
    dense = _step_memory("dense", 16384)
    # Dense holds [T, T] scores (16K: 1 GiB per head in f32); blockwise holds [512, 512] blocks.
    assert blockwise[16384] < dense / 4, (blockwise, dense)
    # 4x the tokens from 4K to 16K: at most 4x the memory (a fixed part makes it less); quadratic would be 16x.
    assert blockwise[16384] < 4 * blockwise[4096], blockwise
    # Past the fixed part, memory doubles with the tokens.
    assert 1.6 < blockwise[32768] / blockwise[16384] < 2.4, blockwise


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_blockwise_memory_stays_linear_when_layers_are_recomputed(remat):
    """Under remat the layer's forward is recomputed in the backward pass; the kernel's per-block scores must not
    become stored residuals there (they did: 5.4 GB instead of 60 MB at 16K for this model)."""
    short, long = (_step_memory("blockwise", steps, remat) for steps in (4096, 16384))
    assert long < 4 * short and long < 2 * _step_memory("blockwise", 16384), (short, long)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
@pytest.mark.parametrize("layout", ["one_sequence_per_row", "packed"])
def test_blockwise_on_gpu_takes_cudnn_when_rows_are_single_sequences_and_equals_dense(layout):
    """On a GPU, bf16 self-attention over rows that each hold one sequence from slot 0 (with an all-padding row)
    runs cuDNN's kernel; packed rows run the portable one. Either way: output and gradients equal the f32 dense
    reference to bf16 accuracy."""
    from jaxagent.models.attention import attention

    steps, rng = 256, np.random.default_rng(2)
    rows = 3
    segments = np.ones((rows, steps), np.int32)
    segments[0, 200:] = 0  # right padding
    segments[2] = 0  # a padding row of a minibatch
    if layout == "packed":
        segments[1, 100:] = 2
    order = np.broadcast_to(np.arange(steps), (rows, steps)).astype(np.int32)
    shape = (rows, 2, 4, steps, 64)
    q = rng.normal(size=shape).astype(np.float32)
    keys, values = (rng.normal(size=(rows, 2, steps, 64)).astype(np.float32) for _ in range(2))
    probe = rng.normal(size=shape).astype(np.float32)

    def loss(kernel, dtype, q, keys, values):
        source = KeySource(keys.astype(dtype), values.astype(dtype), jnp.asarray(segments), jnp.asarray(order))
        out = attention(q.astype(dtype), [source], jnp.asarray(segments), jnp.asarray(order), 0.125, kernel)
        return jnp.sum(out.astype(jnp.float32) * probe), out

    fast = jax.jit(jax.value_and_grad(lambda *a: loss("blockwise", jnp.bfloat16, *a), argnums=(0, 1, 2),
                                      has_aux=True))
    assert ("cudnn" in fast.lower(q, keys, values).as_text().lower())  # the fused kernel is in the program
    (_, out), grads = fast(q, keys, values)
    (_, ref_out), ref_grads = jax.value_and_grad(lambda *a: loss("dense", jnp.float32, *a), argnums=(0, 1, 2),
                                                 has_aux=True)(q, keys, values)
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float32) - b) / np.linalg.norm(b))  # noqa: E731
    assert rel(out, np.asarray(ref_out)) < 1e-2
    assert not np.asarray(out[2], np.float32).any()  # the padding row sees nothing
    for grad, ref in zip(grads, ref_grads):
        assert rel(grad, np.asarray(ref)) < 2e-2 and np.isfinite(np.asarray(grad, np.float32)).all()
