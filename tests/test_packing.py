"""Packing trajectories into shared rows gives the update exactly the loss, gradient and statistics of one padded
row per trajectory, and the learner's log-probs exactly the unpacked ones, on far fewer tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxagent import packing
from jaxagent.algorithms.batching import LogprobComputer, sequence_batch
from jaxagent.models import LoraConfig, ModelConfig, init_params
from jaxagent.models.heads import init_value_head
from jaxagent.trajectory import Trajectory, turn_indices
from jaxagent.update import LossConfig, OptimConfig, UpdateConfig, make_update_step

MODEL = ModelConfig(family="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, qkv_bias=True, attention_block=16)
LORA = LoraConfig(rank=4, alpha=8.0)
LENGTHS = [37, 9, 60, 21, 14, 50, 33, 5, 26]  # the longest sets the bucket (128): unpacked, most of it is padding


def _trajectories(seed: int = 0) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(LENGTHS):
        mask = np.zeros(n, np.int8)
        mask[n // 3:n // 2] = 1
        mask[2 * n // 3:n - 1] = 1
        logp = np.where(mask > 0, rng.normal(-1.5, 0.3, n), 0.0).astype(np.float32)
        out.append(Trajectory(rng.integers(0, MODEL.vocab_size, n).astype(np.int32), mask, logp, turn_indices(mask),
                              float(rng.uniform()), i // 3, i % 3, f"t{i}", {}))
    return out


def test_first_fit_places_every_trajectory_once_within_its_row():
    lengths = list(np.random.default_rng(1).integers(1, 100, 40))
    rows = packing.first_fit(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(40))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) <= 2 * sum(lengths) / 128 + 1  # first-fit never leaves two rows each at most half full
    with pytest.raises(ValueError, match="does not fit"):
        packing.first_fit([129], 128)


def test_packed_rows_hold_each_trajectory_as_its_own_segment_at_its_index():
    trajectories = _trajectories()
    packed = packing.pack([t.token_ids for t in trajectories], 10, 64, groups=2)
    rows_per_group = packed.tokens_RxL.shape[0] // 2
    for n, t in enumerate(trajectories):
        group_rows = packed.tokens_RxL[(n // 5) * rows_per_group:(n // 5 + 1) * rows_per_group].reshape(-1)
        np.testing.assert_array_equal(group_rows[packed.index_NxT[n, :len(t.token_ids)]], t.token_ids)
        segments = packed.segment_ids_RxL[(n // 5) * rows_per_group + packed.rows[n]]
        span = segments[packed.offsets[n]:packed.offsets[n] + len(t.token_ids)]
        assert span[0] > 0 and np.all(span == span[0]) and np.sum(segments == span[0]) == len(t.token_ids)
    # Group 0 holds 141 tokens (3 rows of 64 at least), group 1 114 (2): 3 rows each instead of 5 padded rows.
    assert packed.tokens_RxL.shape == (6, 64)


@pytest.fixture(scope="module")
def weights():
    params, lora_params = init_params(MODEL, jax.random.key(0), LORA)
    lora_params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora_params)
    return params, lora_params


CASES = {
    "loop per-token ratio, LoRA, KL to the base": (LossConfig(kl_coef=0.1, denominator="rows"), True, False, 1),
    "per-turn ratio, two micro-batches": (LossConfig(ratio_level="turn"), True, False, 2),
    "ppo: per-token advantages and a value head": (LossConfig(value_coef=0.5, value_coef_end=0.5), False, True, 1),
    "sft, per token": (LossConfig(kind="sft"), False, False, 1),
}


@pytest.mark.parametrize("case", CASES)
def test_a_packed_batch_has_the_loss_gradient_and_statistics_of_the_padded_one(weights, case):
    loss, with_lora, with_value, micro = CASES[case]
    params, lora_params = weights
    trajectories = _trajectories()
    rng = np.random.default_rng(2)
    # Old log-probs near the policy's own, so that ratios lie on both sides of the clipping bounds.
    own, _ = LogprobComputer(MODEL, LORA, 1.0)(params, lora_params, None, trajectories, len(trajectories))
    old = [logp + np.where(t.model_mask > 0, rng.normal(0, 0.1, len(logp)), 0).astype(np.float32)
           for t, logp in zip(trajectories, own)]
    extra = {}
    if with_value:  # PPO's per-token advantages and returns
        extra = {"token_advantages": [rng.normal(0, 1, len(t.token_ids)).astype(np.float32) for t in trajectories],
                 "returns": [rng.uniform(0, 1, len(t.token_ids)).astype(np.float32) for t in trajectories]}
    make = lambda pack: sequence_batch(trajectories, advantages=rng_advantages, rows=10, old_logprobs=old,  # noqa
                                       pack=pack, micro_batches=micro, **extra)
    rng_advantages = list(np.random.default_rng(3).normal(0, 1, len(trajectories)))
    padded, packed = make(False), make(True)
    assert packed.packed_tokens_RxL.size < padded.tokens_NxT.size / 2
    trainable = {"lora": lora_params} if with_lora else {"params": params}
    frozen = {"params": params} if with_lora else {}
    if with_value:
        trainable["value_head"] = {"kernel": 0.1 * jnp.ones(MODEL.hidden_size), "bias": jnp.asarray(0.4)}
    step = make_update_step(MODEL, UpdateConfig(loss, OptimConfig(), micro_batches=micro), LORA if with_lora else None)
    results = [step.gradients(trainable, frozen, jax.tree.map(jnp.asarray, batch), jnp.asarray(0), jax.random.key(0))
               for batch in (padded, packed)]
    (loss_a, grads_a, count_a, stats_a), (loss_b, grads_b, count_b, stats_b) = results
    assert float(count_a) == float(count_b) > 0
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_a)) > 1e-4  # the gradient is not trivially 0
    for name in stats_a:
        np.testing.assert_allclose(np.asarray(stats_b[name]), np.asarray(stats_a[name]), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_packed_learner_logprobs_and_values_equal_the_unpacked_ones(weights):
    params, lora_params = weights
    trajectories = _trajectories(4)
    head = init_value_head(MODEL)
    head = {"kernel": head["kernel"] + 0.1, "bias": head["bias"]}
    results = [LogprobComputer(MODEL, LORA, 0.7, pack=pack)(params, lora_params, head, trajectories, 6)
               for pack in (False, True)]
    (logp_a, values_a), (logp_b, values_b) = results
    for t, a, b, va, vb in zip(trajectories, logp_a, logp_b, values_a, values_b):
        assert len(a) == len(b) == len(t.token_ids)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(vb, va, rtol=1e-5, atol=1e-6)
    assert all(a[0] == 0.0 for a in logp_b)  # a segment's first token is predicted from nothing
