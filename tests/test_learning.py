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
from jaxagent.buckets import LENGTH_BUCKETS, round_up
from jaxagent.config import OptimConfig
from jaxagent.objectives import sequence_logprobs
from jaxagent.trajectory import PairBatch, pad_trajectories
from jaxagent.update import LossConfig, UpdateConfig, init_train_state, make_update_step

REAL_TARGETS = loop_algorithms.targets


def mean_logprobs(setup, trainable, trajectories) -> np.ndarray:
    """Each trajectory's mean log-probability over its model tokens under `trainable`'s parameters."""
    logps, _ = LogprobComputer(setup.model, None, 1.0)(trainable["params"], None, None, trajectories, 8)
    return np.array([lp[t.model_mask.astype(bool)].mean() for lp, t in zip(logps, trajectories)])


def learn_once(name, rollouts, trajectories, targets=REAL_TARGETS):
    """One iteration of algorithm `name` on `trajectories` from the rollouts' policy: (trainable before, state
    after, the token length of every minibatch the update step took)."""
    setup, policy, config, _ = rollouts
    loop_cfg = dataclasses.replace(config.loop, minibatch_size=4, critic_warmup_iterations=0, epochs=2)
    update_config = UpdateConfig(loop_algorithms.loss_config(name, loop_cfg, 4, 1.0),
                                 OptimConfig(lr=1e-3, weight_decay=0.0))
    lengths = []

    def place(batch):
        lengths.append(batch.tokens_NxT.shape[-1])
        return batch

    stage = loop_algorithms.RLStage(name, loop_algorithms.get_algorithm(name), loop_cfg, update_config,
                                    make_update_step(setup.model, update_config, None),
                                    LogprobComputer(setup.model, None, 1.0), frozen={}, place=place)
    trainable = loop_algorithms.trainable_of(stage.algorithm, setup, policy)
    state = init_train_state(jax.tree.map(jnp.copy, trainable), update_config)
    loop_algorithms.targets = targets  # _learn looks its targets function up at call time
    try:
        state, stats = loop_algorithms._learn(stage, state, trajectories, 1, np.random.default_rng(0),
                                              jax.random.key(1))
    finally:
        loop_algorithms.targets = REAL_TARGETS
    assert stats["updates"] > 0
    return trainable, state, lengths


def direction_violations(name, rollouts, targets=REAL_TARGETS) -> list[str]:
    """Run one iteration of algorithm `name`; the rollouts whose log-probability moved against their reward
    (reward 1 must rise, reward 0 must fall: both beat / lose to every group mean)."""
    setup, _, _, trajectories = rollouts
    trainable, state, _ = learn_once(name, rollouts, trajectories, targets)
    delta = mean_logprobs(setup, state.trainable, trajectories) - mean_logprobs(setup, trainable, trajectories)
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


def with_unsampled_tail(trajectory, length: int):
    """`trajectory` grown to `length` tokens with mask-0 tokens, as a context overflow leaves it: the end-of-turn
    token the harness closes the turn with, then template text the model never saw."""
    extra = length - len(trajectory.token_ids)
    grow = lambda values, fill: np.concatenate([values, np.full(extra, fill, values.dtype)])  # noqa: E731
    return dataclasses.replace(trajectory, token_ids=grow(trajectory.token_ids, 5),
                               model_mask=grow(trajectory.model_mask, 0),
                               sample_logprobs=grow(trajectory.sample_logprobs, 0.0),
                               turn_index=grow(trajectory.turn_index, -1))


def test_tokens_after_the_last_sample_change_neither_the_update_nor_the_batch_length(rollouts):
    """A record one token past a length bucket, all of it after its last sampled token, trains exactly like the
    record without those tokens and does not pad the minibatch into the next bucket."""
    _, _, _, trajectories = rollouts
    bucket = round_up(max(len(t.token_ids) for t in trajectories), LENGTH_BUCKETS, "length")
    overflowing = [with_unsampled_tail(trajectories[0], bucket + 1), *trajectories[1:]]
    _, plain, plain_lengths = learn_once("loop", rollouts, trajectories)
    _, tail, tail_lengths = learn_once("loop", rollouts, overflowing)
    assert set(tail_lengths) == set(plain_lengths) == {bucket}
    for a, b in zip(jax.tree.leaves(plain.trainable), jax.tree.leaves(tail.trainable)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-7)
