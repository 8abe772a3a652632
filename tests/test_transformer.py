"""The decoder against transformers' PyTorch models, and its own invariants (packing, cache, remat, dtypes)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxagent.models import ModelConfig, forward, init_cache, init_params, param_axes, positions_from_segments
from jaxagent.models.hf import load_hf_params

from conftest import FAMILIES, VOCAB, hf_logits

TINY = ModelConfig(family="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)


def _batch(seed: int = 0, batch: int = 3, length: int = 20):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_matches_transformers_with_left_padding(hf_models, family):
    ids, mask = _batch()
    config, params = load_hf_params(hf_models[family])
    ours = forward(params, config, jnp.asarray(ids), segment_ids_BxT=jnp.asarray(mask)).logits_BxTxV
    ref = hf_logits(hf_models[family], ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-4, rtol=0)


def test_positions_from_segments_restart_per_segment_and_skip_padding():
    segments = jnp.array([[0, 0, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 3, 3, 3]])
    expected = np.array([[0, 0, 0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0, 1, 2]])
    np.testing.assert_array_equal(positions_from_segments(segments), expected)


@pytest.mark.parametrize("jit", [False, True])
def test_packed_segments_equal_separate_sequences(jit):
    params, _ = init_params(TINY, jax.random.key(1))
    run = jax.jit(forward, static_argnums=1) if jit else forward
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, VOCAB, (1, 7)), rng.integers(0, VOCAB, (1, 5))
    packed = jnp.asarray(np.concatenate([a, b, np.zeros((1, 3), np.int64)], axis=1))
    segments = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 3])
    out = run(params, TINY, packed, None, segments).logits_BxTxV
    alone_a = run(params, TINY, jnp.asarray(a)).logits_BxTxV
    alone_b = run(params, TINY, jnp.asarray(b)).logits_BxTxV
    np.testing.assert_allclose(out[0, :7], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:12], alone_b[0], atol=1e-5)


def test_cache_prefill_then_decode_equals_full_forward():
    params, _ = init_params(TINY, jax.random.key(2))
    ids, mask = _batch(seed=3, length=12)
    full = forward(params, TINY, jnp.asarray(ids), segment_ids_BxT=jnp.asarray(mask)).logits_BxTxV
    positions = positions_from_segments(jnp.asarray(mask))
    cache = init_cache(TINY, batch=3, max_len=32)
    step = jax.jit(forward, static_argnums=1)
    prefill = step(params, TINY, jnp.asarray(ids[:, :8]), positions[:, :8], jnp.asarray(mask[:, :8]), cache)
    real = mask.astype(bool)  # logits at padding slots are meaningless and not compared
    np.testing.assert_allclose(np.asarray(prefill.logits_BxTxV)[real[:, :8]], np.asarray(full[:, :8])[real[:, :8]],
                               atol=1e-5)
    cache = prefill.cache
    for t in range(8, 12):
        out = step(params, TINY, jnp.asarray(ids[:, t:t + 1]), positions[:, t:t + 1], jnp.asarray(mask[:, t:t + 1]),
                   cache)
        rows = real[:, t]
        np.testing.assert_allclose(np.asarray(out.logits_BxTxV)[rows, 0], np.asarray(full)[rows, t], atol=1e-5)
        cache = out.cache
    # Rows end after their last real token; padding-only chunks do not advance a row.
    np.testing.assert_array_equal(cache.end_B, [12, 12, 1])


def test_cache_rows_advance_by_their_own_real_tokens():
    """A right-padded chunk moves each row's end past its real tokens only; the next write fills the gap."""
    params, _ = init_params(TINY, jax.random.key(3))
    rng = np.random.default_rng(4)
    first, second = rng.integers(0, VOCAB, (2, 4)), rng.integers(0, VOCAB, (2, 3))
    chunk_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    cache = init_cache(TINY, batch=2, max_len=16)
    out = forward(params, TINY, jnp.asarray(first), jnp.asarray([[0, 1, 2, 3], [0, 1, 0, 0]]), jnp.asarray(chunk_mask),
                  cache)
    np.testing.assert_array_equal(out.cache.end_B, [4, 2])
    positions = jnp.asarray([[4, 5, 6], [2, 3, 4]])
    out2 = forward(params, TINY, jnp.asarray(second), positions, jnp.ones((2, 3), jnp.int32), out.cache)
    row1 = np.concatenate([first[1, :2], second[1]])[None]
    alone = forward(params, TINY, jnp.asarray(row1)).logits_BxTxV
    np.testing.assert_allclose(out2.logits_BxTxV[1], alone[0, 2:], atol=1e-5)


def test_remat_changes_nothing_but_memory():
    params, _ = init_params(TINY, jax.random.key(4))
    ids = jnp.asarray(_batch()[0])

    def loss(p, config):
        return jnp.mean(forward(p, config, ids).logits_BxTxV ** 2)

    plain = jax.grad(loss)(params, TINY)
    for policy in ("full", "dots"):
        remat = jax.grad(loss)(params, TINY.replace(remat=policy))
        chex.assert_trees_all_close(plain, remat, atol=1e-6)


def test_bf16_params_and_compute_run_close_to_f32():
    params, _ = init_params(TINY, jax.random.key(5))
    ids = jnp.asarray(_batch()[0])
    ref = forward(params, TINY, ids).logits_BxTxV
    config = TINY.replace(dtype="bf16", param_dtype="bf16")
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = forward(params16, config, ids).logits_BxTxV
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05


def test_every_parameter_has_logical_axis_names():
    config = TINY.replace(family="qwen3", qk_norm=True, tie_word_embeddings=False)
    params, _ = init_params(config, jax.random.key(0))
    axes, _ = param_axes(config)
    valid = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers"}
    for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(
            x, jax.sharding.PartitionSpec))):
        assert len(spec) == leaf.ndim and set(spec) <= valid, (spec, leaf.shape)


def test_parameters_of_another_shape_are_refused_by_name():
    """The model checks each stored parameter's shape against the config's (Flax would trace each initializer
    to do so; the model compares shapes itself)."""
    params, _ = init_params(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match=r"parameter layers/mlp/gate/kernel has shape \(64, 96\); this model "
                                         r"expects \(64, 128\)"):
        forward(params, TINY.replace(intermediate_size=128), jnp.ones((1, 4), jnp.int32))
