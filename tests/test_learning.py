"""Learning goes the right way: one iteration through the real `_learn` path (advantages, filter, shuffle,
minibatches, update) raises the log-probability of the rollouts that beat their group and lowers the others', for
LOOP, GRPO, RLOO and PPO; DPO and Bradley-Terry steps widen the chosen side's margin. Each check is also run on a
deliberately broken batch (advantages misaligned with their rows, pairs swapped) and must then fail."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxagent import losses
from jaxagent.algorithms import loop as loop_algorithms
from jaxagent.algorithms.batching import LogprobComputer, sequence_batch
from jaxagent.config import OptimConfig
from jaxagent.objectives import sequence_logprobs
from jaxagent.trajectory import PairBatch, pad_trajectories
from jaxagent.update import LossConfig, UpdateConfig, init_train_state, make_update_step

REAL_TARGETS = loop_algorithms.targets


def mean_logprobs(setup, trainable, trajectories) -> np.ndarray:
    """Each trajectory's mean log-probability over its model tokens under `trainable`'s parameters."""
    logps, _ = LogprobComputer(setup.model, None, 1.0)(trainable["params"], None, None, trajectories, 8)
    return np.array([lp[t.model_mask.astype(bool)].mean() for lp, t in zip(logps, trajectories)])


def direction_violations(name, rollouts, targets=REAL_TARGETS) -> list[str]:
    """Run one iteration of algorithm `name`; the rollouts whose log-probability moved against their reward
    (reward 1 must rise, reward 0 must fall: both beat / lose to every group mean)."""
    setup, policy, config, trajectories = rollouts
    loop_cfg = dataclasses.replace(config.loop, minibatch_size=4, critic_warmup_iterations=0, epochs=2)
    update_config = UpdateConfig(loop_algorithms.loss_config(name, loop_cfg, 4, 1.0),
                                 OptimConfig(lr=1e-3, weight_decay=0.0))
    stage = loop_algorithms.RLStage(name, loop_algorithms.get_algorithm(name), loop_cfg, update_config,
                                    make_update_step(setup.model, update_config, None),
                                    LogprobComputer(setup.model, None, 1.0), frozen={})
    trainable = loop_algorithms.trainable_of(stage.algorithm, setup, policy)
    state = init_train_state(jax.tree.map(jnp.copy, trainable), update_config)
    before = mean_logprobs(setup, trainable, trajectories)
    loop_algorithms.targets = targets  # _learn looks its targets function up at call time
    try:
        state, stats = loop_algorithms._learn(stage, state, trajectories, 1, np.random.default_rng(0),
                                              jax.random.key(1))
    finally:
        loop_algorithms.targets = REAL_TARGETS
    assert stats["updates"] > 0
    delta = mean_logprobs(setup, state.trainable, trajectories) - before
    return [f"{t.task_id}/{t.rollout_index} reward {t.reward}: {d:+.4f}" for t, d in zip(trajectories, delta)
            if (t.reward == 1.0 and d <= 0) or (t.reward == 0.0 and d >= 0)]


def misaligned(stage, state, trajectories, iteration):
    """The real targets with each trajectory's advantage moved to its neighbour (a row/advantage mix-up)."""
    target = REAL_TARGETS(stage, state, trajectories, iteration)
    roll = lambda values: None if values is None else values[1:] + values[:1]  # noqa: E731
    return target._replace(advantages=np.roll(target.advantages, -1), token_advantages=roll(target.token_advantages),
                           keep=np.ones_like(target.keep))


@pytest.mark.parametrize("name", ["loop", "grpo", "rloo", "ppo"])
def test_an_iteration_raises_good_rollouts_and_lowers_bad_ones(name, rollouts):
    assert direction_violations(name, rollouts) == []


@pytest.mark.parametrize("name", ["loop", "ppo"])
def test_misaligned_advantages_are_caught(name, rollouts):
    assert direction_violations(name, rollouts, targets=misaligned) != []


def _pairs(rollouts, swap=False) -> tuple[PairBatch, np.ndarray]:
    """Per task: chosen = its reward-1 rollout, rejected = its reward-0 one (swapped on request)."""
    _, _, _, trajectories = rollouts
    by_task = {}
    for t in trajectories:
        by_task.setdefault(t.group_id, {})[t.reward] = t
    pairs = [(group[1.0], group[0.0]) for group in by_task.values()]
    if swap:
        pairs = [(b, a) for a, b in pairs]
    padded = pad_trajectories([t for pair in pairs for t in pair])
    shape = lambda x: jnp.asarray(x.reshape(len(pairs), 2, -1))  # noqa: E731
    batch = PairBatch(shape(padded["tokens"]), shape(padded["segment_ids"]), shape(padded["model_mask"]),
                      shape(padded["turn_index"]), jnp.ones(len(pairs)))
    return batch, padded


def margin(setup, params, ref, batch, kind):
    """DPO: mean over pairs of the chosen-minus-rejected log-ratio to the reference; Bradley-Terry: of the
    critic's score (trajectory_mean of the log-ratio)."""
    pairs, _, steps = batch.tokens_Px2xT.shape
    logp, _ = sequence_logprobs(params, setup.model, batch.tokens_Px2xT.reshape(-1, steps),
                                batch.segment_ids_Px2xT.reshape(-1, steps), None, None, 1.0, 512)
    logp, mask = logp.reshape(pairs, 2, steps), batch.model_mask_Px2xT
    if kind == "dpo":
        side = jnp.sum(jnp.where(mask > 0, logp - ref, 0.0), axis=2)
    else:
        side = jnp.stack([losses.critic_scores(logp[:, k], ref[:, k], mask[:, k]) for k in (0, 1)], axis=1)
    return float(jnp.mean(side[:, 0] - side[:, 1]))


def pair_margin_change(rollouts, kind, swap=False) -> float:
    """How much three steps of `kind` on the (possibly swapped) pairs change the true chosen-over-rejected margin."""
    setup, policy, _, _ = rollouts
    batch, _ = _pairs(rollouts, swap)
    pairs, _, steps = batch.tokens_Px2xT.shape
    ref, _ = sequence_logprobs(policy.params, setup.model, batch.tokens_Px2xT.reshape(-1, steps),
                               batch.segment_ids_Px2xT.reshape(-1, steps), None, None, 1.0, 512)
    ref = ref.reshape(pairs, 2, steps)
    config = UpdateConfig(LossConfig(kind=kind, beta=0.1), OptimConfig(lr=1e-3, weight_decay=0.0))
    step = make_update_step(setup.model, config, None)
    state = init_train_state(jax.tree.map(jnp.copy, {"params": policy.params}), config)
    for i in range(3):
        state, metrics = step(state, {}, batch._replace(ref_logprobs_Px2xT=ref), jax.random.key(i))
    true_batch, _ = _pairs(rollouts)
    true_ref = ref[:, ::-1] if swap else ref
    return margin(setup, state.trainable["params"], true_ref, true_batch, kind)


@pytest.mark.parametrize("kind", ["dpo", "bradley_terry"])
def test_pair_losses_widen_the_chosen_margin_and_swapped_pairs_narrow_it(kind, rollouts):
    assert pair_margin_change(rollouts, kind) > 0  # the margin starts at 0: policy == reference
    assert pair_margin_change(rollouts, kind, swap=True) < 0


def test_sequence_batch_keeps_each_advantage_on_its_row(rollouts):
    """The batch builder puts advantage i on trajectory i's row, whatever order the minibatch drew them in."""
    _, _, _, trajectories = rollouts
    order = [4, 0, 5, 2]
    batch = sequence_batch([trajectories[i] for i in order], advantages=[float(i) for i in order], rows=6)
    for row, i in enumerate(order):
        n = len(trajectories[i].token_ids)
        np.testing.assert_array_equal(batch.tokens_NxT[row, :n], trajectories[i].token_ids)
        assert batch.advantages[row] == float(i) and batch.weights_N[row] == 1.0
    assert batch.weights_N[4:].tolist() == [0.0, 0.0]
