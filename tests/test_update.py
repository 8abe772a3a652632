"""The jitted update step: LoRA-only training, reference = base weights, exact micro-batching, non-finite guard."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxagent.config import ConfigError
from jaxagent.models import LoraConfig, ModelConfig, forward, init_params
from jaxagent.models.heads import init_value_head
from jaxagent.placement import Placement
from jaxagent.update import (
    LossConfig,
    NonFiniteError,
    OptimConfig,
    PairBatch,
    SequenceBatch,
    UpdateConfig,
    UpdateConfigError,
    check_nonfinite,
    init_train_state,
    make_update_step,
    sequence_logprobs,
)

MODEL = ModelConfig(family="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, qkv_bias=True)
LORA = LoraConfig(rank=4, alpha=8.0)
N, T = 8, 20


def _randomize(tree, seed, scale=0.05):
    leaves, structure = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(structure, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                          for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def weights():
    params, lora_params = init_params(MODEL, jax.random.key(0), LORA)
    return params, _randomize(lora_params, 1)


def _fresh_state(trainable, config):
    """A train state over copies: the step donates its state, and the fixture's arrays are shared by tests."""
    return init_train_state(jax.tree.map(jnp.copy, trainable), config)


def _batch(params, lora_params, seed=0, advantages=None, model=MODEL):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL.vocab_size, (N, T))
    segments = np.ones((N, T), np.int32)
    segments[::3, T - 4:] = 0  # some right padding
    mask = np.zeros((N, T), np.int32)
    turn = np.zeros((N, T), np.int32)
    mask[:, 5:9], mask[:, 12:15] = 1, 1
    turn[:, 12:15] = 1
    mask = mask * segments
    logp, _ = sequence_logprobs(params, model, jnp.asarray(tokens), jnp.asarray(segments), lora_params, LORA, 1.0, 8)
    adv = rng.normal(0, 0.5, N) if advantages is None else advantages
    return SequenceBatch(jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(mask), jnp.asarray(turn), logp, logp,
                         jnp.asarray(adv, jnp.float32), jnp.ones((N,), jnp.float32))


def test_lora_update_changes_only_lora_leaves_and_fresh_ratios_are_one(weights):
    params, lora_params = weights
    before = jax.tree.map(np.asarray, params)
    config = UpdateConfig(optim=OptimConfig(lr=1e-2))
    step = make_update_step(MODEL, config, LORA)
    state = _fresh_state({"lora": lora_params}, config)
    old_lora = jax.tree.map(np.asarray, lora_params)
    batch = _batch(params, lora_params)
    state, metrics = step(state, {"params": params}, batch, jax.random.key(0))
    # Fresh rollouts: the learner's log-probs are the sampler's, so every ratio is exactly 1.
    assert float(metrics["ratio_min"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["ratio_max"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["clipped_fraction"]) == 0.0 and abs(float(metrics["approx_kl"])) < 1e-7
    assert int(metrics["model_tokens"]) == int(jnp.sum(batch.model_mask_NxT))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), before)
    assert set(state.trainable) == {"lora"}
    for old, new in zip(jax.tree.leaves(old_lora), jax.tree.leaves(state.trainable["lora"])):
        assert float(jnp.abs(new - old).max()) > 0
    # A second step sees ratios != 1 and reports them.
    state, metrics = step(state, {"params": params}, batch, jax.random.key(1))
    assert float(metrics["ratio_max"]) > 1.0 or float(metrics["ratio_min"]) < 1.0


def test_reference_is_the_base_model_with_lora_off(weights):
    params, lora_params = weights
    pairs = 3
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, MODEL.vocab_size, (pairs, 2, T)))
    segments = jnp.ones((pairs, 2, T), jnp.int32)
    mask = jnp.zeros((pairs, 2, T), jnp.int32).at[..., 6:16].set(1)
    turns = jnp.zeros((pairs, 2, T), jnp.int32)
    base = forward(params, MODEL, tokens.reshape(-1, T)).logits_BxTxV
    base_logp = jnp.take_along_axis(jax.nn.log_softmax(base[:, :-1]), tokens.reshape(-1, T)[:, 1:, None], -1)[..., 0]
    explicit_ref = jnp.pad(base_logp, ((0, 0), (1, 0))).reshape(pairs, 2, T)
    adapted = forward(params, MODEL, tokens.reshape(-1, T), lora_params=lora_params, lora=LORA).logits_BxTxV
    assert float(jnp.abs(adapted - base).max()) > 1e-3  # the adapters matter, so "LoRA off" is a real reference
    config = UpdateConfig(loss=LossConfig(kind="dpo", beta=0.5))
    step = make_update_step(MODEL, config, LORA)
    implicit = PairBatch(tokens, segments, mask, turns, jnp.ones((pairs,)))
    explicit = implicit._replace(ref_logprobs_Px2xT=explicit_ref)
    trainable, frozen = {"lora": lora_params}, {"params": params}
    loss_implicit, grads_implicit, *_ = step.gradients(trainable, frozen, implicit, 0, jax.random.key(0))
    loss_explicit, grads_explicit, *_ = step.gradients(trainable, frozen, explicit, 0, jax.random.key(0))
    np.testing.assert_allclose(loss_implicit, loss_explicit, rtol=1e-6)
    chex.assert_trees_all_close(grads_implicit, grads_explicit, atol=1e-7)


@pytest.mark.parametrize("loss", [LossConfig(), LossConfig(ratio_level="turn"), LossConfig(kind="sft"),
                                  LossConfig(clip="symmetric", epsilon=0.2, kl_coef=0.05)])
def test_micro_batches_give_the_full_batch_gradient(weights, loss):
    """Tolerance 1e-6 absolute / 1e-5 relative: float32 sums in a different order, nothing else."""
    params, lora_params = weights
    batch = _batch(params, lora_params, seed=3)
    batch = batch._replace(old_logprobs_NxT=batch.old_logprobs_NxT + 0.05 * jnp.asarray(
        np.random.default_rng(4).normal(size=(N, T)), jnp.float32))  # ratios away from 1, some clipped
    trainable, frozen = {"lora": lora_params}, {"params": params}
    results = {}
    for micro in (1, 2, 4):
        step = make_update_step(MODEL, UpdateConfig(loss=loss, micro_batches=micro), LORA)
        results[micro] = step.gradients(trainable, frozen, batch, 0, jax.random.key(0))
    for micro in (2, 4):
        np.testing.assert_allclose(results[micro][0], results[1][0], rtol=1e-5)
        chex.assert_trees_all_close(results[micro][1], results[1][1], atol=1e-6, rtol=1e-5)


def test_a_float64_model_sums_in_float64_so_micro_batching_agrees_to_1e_12():
    """A float64 model is for reference runs (one device against a mesh): every sum, softmax and norm runs in float64.
    Micro-batching only reorders the sums, so the gradients agree to 1e-12; a float32 step left in the attention or
    the log-probs would show as a ~1e-7 difference."""
    with jax.enable_x64(True):
        model = dataclasses.replace(MODEL, dtype=jnp.float64, param_dtype=jnp.float64)
        params = _randomize(init_params(model, jax.random.key(0))[0], 2, scale=0.2)
        batch = _batch(params, None, seed=5, model=model)
        batch = batch._replace(old_logprobs_NxT=batch.old_logprobs_NxT + 0.05 * np.random.default_rng(6).normal(
            size=(N, T)))  # ratios away from 1
        results = {}
        for micro in (1, 4):
            step = make_update_step(model, UpdateConfig(micro_batches=micro), None)
            results[micro] = step.gradients({"params": params}, {}, batch, 0, jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(results[1][1])} == {np.dtype(np.float64)}
    np.testing.assert_allclose(results[4][0], results[1][0], rtol=1e-12)
    chex.assert_trees_all_close(results[4][1], results[1][1], atol=1e-13, rtol=1e-12)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(weights):
    params, lora_params = weights
    config = UpdateConfig(max_nonfinite_in_row=2)
    step = make_update_step(MODEL, config, LORA)
    state = _fresh_state({"lora": lora_params}, config)
    good = _batch(params, lora_params, seed=5)
    bad = good._replace(advantages=good.advantages.at[2].set(jnp.nan))
    state, _ = step(state, {"params": params}, good, jax.random.key(0))
    snapshot = jax.tree.map(np.asarray, (state.trainable, state.opt_state))
    state, metrics = step(state, {"params": params}, bad, jax.random.key(1))
    assert bool(metrics["skipped_nonfinite"]) and int(state.nonfinite_in_row) == 1 and int(state.step) == 1
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, (state.trainable, state.opt_state)), snapshot)
    check_nonfinite(state, metrics, config.max_nonfinite_in_row)  # one in a row: logged, not fatal
    state, metrics = step(state, {"params": params}, bad, jax.random.key(2))
    with pytest.raises(NonFiniteError, match="2 update steps in a row had a non-finite loss"):
        check_nonfinite(state, metrics, config.max_nonfinite_in_row)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.trainable))
    state, metrics = step(state, {"params": params}, good, jax.random.key(3))
    assert int(state.nonfinite_in_row) == 0 and int(state.nonfinite_total) == 2 and int(state.step) == 2


def test_ppo_trains_the_value_head_with_its_scheduled_weight(weights):
    params, lora_params = weights
    batch = _batch(params, lora_params, seed=6)
    returns = jnp.where(batch.model_mask_NxT > 0, 0.9, 0.0)
    batch = batch._replace(advantages=jnp.broadcast_to(batch.advantages[:, None], (N, T)), returns_NxT=returns)
    config = UpdateConfig(loss=LossConfig(value_coef=0.1, value_coef_end=0.001, value_coef_steps=10),
                          optim=OptimConfig(lr=1e-2))
    step = make_update_step(MODEL, config, LORA)
    state = _fresh_state({"lora": lora_params, "value_head": init_value_head(MODEL)}, config)
    head_before = jax.tree.map(np.asarray, state.trainable["value_head"])
    state, metrics = step(state, {"params": params}, batch, jax.random.key(0))
    assert float(jnp.abs(state.trainable["value_head"]["bias"] - head_before["bias"])) > 0
    assert np.isfinite(float(metrics["loss"]))


def test_sft_steps_lower_the_loss(weights):
    params, lora_params = weights
    batch = _batch(params, lora_params, seed=7)
    config = UpdateConfig(loss=LossConfig(kind="sft"), optim=OptimConfig(lr=2e-2))
    step = make_update_step(MODEL, config, LORA)
    state = _fresh_state({"lora": lora_params}, config)
    first = None
    for i in range(8):
        state, metrics = step(state, {"params": params}, batch, jax.random.key(i))
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first - 0.1


def test_full_parameter_training_without_lora(weights):
    params, lora_params = weights
    batch = _batch(params, None, seed=8)
    config = UpdateConfig(optim=OptimConfig(lr=1e-3))
    step = make_update_step(MODEL, config, None)
    state = _fresh_state({"params": params}, config)
    state, metrics = step(state, {}, batch, jax.random.key(0))
    assert float(jnp.abs(state.trainable["params"]["layers"]["mlp"]["up"]["kernel"] -
                         params["layers"]["mlp"]["up"]["kernel"]).max()) > 0
    dpo = make_update_step(MODEL, UpdateConfig(loss=LossConfig(kind="dpo")), None)
    pair = PairBatch(batch.tokens_NxT[:4].reshape(2, 2, T), batch.segment_ids_NxT[:4].reshape(2, 2, T),
                     batch.model_mask_NxT[:4].reshape(2, 2, T), batch.turn_index_NxT[:4].reshape(2, 2, T),
                     jnp.ones((2,)))
    with pytest.raises(UpdateConfigError, match="needs reference log-probs: put them in the batch, or train with LoRA"):
        dpo.gradients({"params": params}, {}, pair, 0, jax.random.key(0))


@pytest.mark.parametrize("make, error, message", [
    (lambda: LossConfig(kind="ppo2"), UpdateConfigError, "loss.kind='ppo2'; valid: policy, sft, dpo, bradley_terry"),
    (lambda: LossConfig(ratio_level="step"), UpdateConfigError,
     "loss.ratio_level='step'; valid: token, turn, trajectory, none"),
    (lambda: OptimConfig(schedule="cosine"), ConfigError, "optim.schedule='cosine' needs optim.total_steps > 0"),
    (lambda: OptimConfig(schedule="exp"), ConfigError, "optim.schedule='exp'; valid: constant, linear, cosine"),
    (lambda: UpdateConfig(micro_batches=0), UpdateConfigError, "micro_batches=0 must be >= 1"),
])
def test_bad_update_config_names_the_field(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_batch_that_does_not_split_is_refused(weights):
    params, lora_params = weights
    step = make_update_step(MODEL, UpdateConfig(micro_batches=3), LORA)
    with pytest.raises(UpdateConfigError, match="batch of 8 rows does not split into micro_batches=3"):
        step.gradients({"lora": lora_params}, {"params": params}, _batch(params, lora_params), 0, jax.random.key(0))


def test_a_short_last_minibatch_weighs_by_the_configured_minibatch_size(weights):
    """LOOP's reference divides a minibatch's summed rollout losses by the configured minibatch size (8 here), so a
    minibatch holding 5 kept rollouts weighs 5/8: checked against NumPy for the loss and, through the model's
    vector-Jacobian product, for the gradient; micro-batching gives the same."""
    params, lora_params = weights
    batch = _batch(params, lora_params, seed=4)
    old = np.asarray(batch.old_logprobs_NxT) + np.random.default_rng(1).normal(0, 0.05, (N, T))
    weights_N = np.array([1, 1, 0, 1, 1, 0, 1, 0], np.float32)  # 5 kept rows of 8
    batch = batch._replace(old_logprobs_NxT=jnp.asarray(old, jnp.float32), weights_N=jnp.asarray(weights_N))
    new = np.asarray(batch.sample_logprobs_NxT, np.float64)
    mask, adv = np.asarray(batch.model_mask_NxT), np.asarray(batch.advantages, np.float64)
    low, high = 1 / 1.1, 1.1
    loss, grad_logp = 0.0, np.zeros((N, T))
    for i in np.flatnonzero(weights_N):
        tokens = np.flatnonzero(mask[i])
        for t in tokens:
            ratio = math.exp(new[i, t] - old[i, t])
            unclipped, clipped = ratio * adv[i], min(max(ratio, low), high) * adv[i]
            loss -= min(unclipped, clipped) / len(tokens) / N
            if unclipped <= clipped:  # the gradient flows through the unclipped side
                grad_logp[i, t] = -ratio * adv[i] / len(tokens) / N

    def logprobs(lp):
        return sequence_logprobs(params, MODEL, batch.tokens_NxT, batch.segment_ids_NxT, lp, LORA, 1.0, 8)[0]

    _, vjp = jax.vjp(logprobs, lora_params)
    expected_grad = vjp(jnp.asarray(grad_logp, jnp.float32))[0]
    for micro in (1, 2, 4):
        config = UpdateConfig(LossConfig(denominator="rows"), micro_batches=micro)
        got_loss, grads, count, _ = make_update_step(MODEL, config, LORA).gradients(
            {"lora": lora_params}, {"params": params}, batch, 0, jax.random.key(0))
        assert float(count) == 5.0
        np.testing.assert_allclose(float(got_loss), loss, rtol=1e-5)
        chex.assert_trees_all_close(grads["lora"], expected_grad, atol=1e-7, rtol=1e-4)
    # Dividing by the kept rows instead (the "count" denominator) weighs the same minibatch 8/5 as much.
    config = UpdateConfig(LossConfig(denominator="count"))
    count_loss, *_ = make_update_step(MODEL, config, LORA).gradients({"lora": lora_params}, {"params": params},
                                                                     batch, 0, jax.random.key(0))
    np.testing.assert_allclose(float(count_loss), loss * N / 5, rtol=1e-5)


def test_an_environment_token_with_a_huge_log_ratio_changes_nothing(weights):
    """Masked tokens are selected away before any exp: a log-ratio of 1,000 on an observation token leaves the loss
    and its gradient finite and equal to the unperturbed batch's, for every ratio level and with a KL term."""
    params, lora_params = weights
    batch = _batch(params, lora_params, seed=5)
    old = np.asarray(batch.old_logprobs_NxT).copy()
    env_token = (2, 10)  # between the two agent turns
    assert np.asarray(batch.model_mask_NxT)[env_token] == 0 and np.asarray(batch.segment_ids_NxT)[env_token] == 1
    old[env_token] -= 1000.0
    ref = np.asarray(batch.sample_logprobs_NxT).copy()
    ref[env_token] += 1000.0
    shifted = batch._replace(old_logprobs_NxT=jnp.asarray(old), ref_logprobs_NxT=jnp.asarray(ref))
    plain = batch._replace(ref_logprobs_NxT=batch.sample_logprobs_NxT)
    for level in ("token", "turn", "trajectory", "none"):
        config = UpdateConfig(LossConfig(ratio_level=level, kl_coef=0.1))
        gradients = make_update_step(MODEL, config, LORA).gradients
        loss, grads, _, _ = gradients({"lora": lora_params}, {"params": params}, shifted, 0, jax.random.key(0))
        base_loss, base_grads, _, _ = gradients({"lora": lora_params}, {"params": params}, plain, 0,
                                                jax.random.key(0))
        assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
        assert float(loss) == float(base_loss), level
        chex.assert_trees_all_equal(grads, base_grads)


def test_a_policy_too_far_from_the_rollouts_stops_the_step(weights):
    """The KL guard: when -mean(trajectory log-ratio) of a minibatch exceeds kl_stop, the step is not applied and
    `high_kl` says so; below the threshold the same step applies."""
    params, lora_params = weights
    batch = _batch(params, lora_params, seed=6)
    far = batch._replace(old_logprobs_NxT=batch.old_logprobs_NxT - 5.0 * batch.model_mask_NxT)
    config = UpdateConfig(LossConfig(), OptimConfig(lr=1e-2), kl_stop=20.0)
    step = make_update_step(MODEL, config, LORA)
    state = _fresh_state({"lora": lora_params}, config)
    state, metrics = step(state, {"params": params}, far, jax.random.key(0))
    assert bool(metrics["high_kl"]) and float(metrics["trajectory_kl"]) < -20.0 and int(state.step) == 0
    chex.assert_trees_all_equal(state.trainable["lora"], lora_params)
    state, metrics = step(state, {"params": params}, batch, jax.random.key(0))
    assert not bool(metrics["high_kl"]) and abs(float(metrics["trajectory_kl"])) < 1e-4 and int(state.step) == 1


def test_adapters_and_their_optimizer_state_stay_float32_under_a_bfloat16_base():
    """Eight AdamW steps at LOOP's lr over a bfloat16 base equal the same steps over that base cast to float32:
    the adapters (and moments) are float32 either way, so no update rounds away."""
    model16 = MODEL.replace(param_dtype="bf16")  # compute stays float32
    params16, lora16 = init_params(model16, jax.random.key(0), LORA)
    lora16 = _randomize(lora16, 1)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lora16))
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params16)
    lora_params = jax.tree.map(lambda x: x.astype(jnp.float32), lora16)
    config = UpdateConfig(optim=OptimConfig(lr=5e-5))
    results = []
    for model, params, adapters in ((model16, params16, lora16), (MODEL, params32, lora_params)):
        step = make_update_step(model, config, LORA)
        state = _fresh_state({"lora": adapters}, config)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
        for i in range(8):
            state, metrics = step(state, {"params": params}, _batch(params32, lora_params, seed=10 + i),
                                  jax.random.key(i))
        assert int(state.step) == 8
        results.append(state.trainable["lora"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(results[0]))
    chex.assert_trees_all_close(results[0], results[1], atol=1e-7, rtol=1e-6)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(lora_params)))
    assert moved > 1e-5  # the steps did update the adapters


def test_a_placed_fresh_state_and_the_state_a_step_returns_share_one_compilation(weights):
    """The run's fresh train state is placed as the step's outputs are, so the second step reuses the first one's
    program (an uncommitted counter in the fresh state cost every stage a second compilation)."""
    params, lora_params = jax.device_put(weights, jax.devices()[0])  # committed, as a restored policy is
    config = UpdateConfig(loss=LossConfig(kind="sft"), optim=OptimConfig(lr=1e-3))
    step, state = Placement(MODEL, LORA).update_step(config, _fresh_state({"lora": lora_params}, config),
                                                     {"params": params})
    batch = _batch(params, lora_params, seed=9)
    for i in range(3):
        state, _ = step(state, {"params": params}, batch, jax.random.key(i))
    assert step.step._cache_size() == 1
