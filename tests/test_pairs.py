"""ETO's preference pairs (explored vs expert: lower, higher, tie, the rejected side cut to the expert's turns + 5)
and trajectory DPO against the policy at the iteration's start: the first step's loss is log 2 for every pair and
its gradient is the closed form's, for full-parameter and LoRA policies."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxagent.algorithms.batching import LogprobComputer
from jaxagent.models import init_params
from jaxagent.models.lora import LoraConfig
from jaxagent.objectives import make_loss_fn, sequence_logprobs
from jaxagent.pairs import eto_pairs, pair_batch, pair_stats, truncate_turns, with_reference
from jaxagent.trajectory import Trajectory, turn_indices
from jaxagent.update import LossConfig

PROMPT, OBSERVATION = [1, 2, 3, 4], [5, 6]


def episode(task: str, reward: float, turns: int, action: int = 7) -> Trajectory:
    """A hand-made record: a prompt, then per agent turn two sampled tokens and an observation."""
    ids, mask = list(PROMPT), [0] * len(PROMPT)
    for turn in range(turns):
        ids += [action + turn, 9]
        mask += [1, 1]
        if turn < turns - 1:
            ids += OBSERVATION
            mask += [0, 0]
    mask = np.asarray(mask, np.int8)
    messages = ({"role": "user", "content": "task"},) + tuple(
        m for turn in range(turns) for m in ({"role": "assistant", "content": f"a{turn}"},
                                              {"role": "user", "content": "obs"}))[:-1]
    return Trajectory(np.asarray(ids, np.int32), mask, np.where(mask, -0.5, 0.0).astype(np.float32),
                      turn_indices(mask), reward, 0, 0, task, {"turns": turns}, messages)


def test_pairs_follow_the_reward_order_and_ties_make_none():
    experts = {"a": episode("a", 1.0, 2), "b": episode("b", 0.5, 2), "c": episode("c", 0.6, 2)}
    lower, higher, tie = episode("a", 0.2, 3, action=20), episode("b", 1.0, 1, action=30), episode("c", 0.6, 4)
    pairs = eto_pairs([lower, higher, tie, episode("unknown", 0.0, 1)], experts)
    assert len(pairs) == 2
    assert pairs[0].chosen is experts["a"] and pairs[0].rejected is lower and pairs[0].chosen_is_expert
    assert pairs[1].chosen is higher and pairs[1].rejected is experts["b"] and not pairs[1].chosen_is_expert
    stats = pair_stats(pairs, explored=4)
    assert stats == {"pairs": 2.0, "explored": 4.0, "chosen_is_expert": 0.5,
                     "reward_gap": pytest.approx(((1.0 - 0.2) + (1.0 - 0.5)) / 2)}


def test_a_long_failure_is_cut_to_the_experts_turns_plus_five():
    expert, failure = episode("a", 1.0, 2), episode("a", 0.0, 12)
    (pair,) = eto_pairs([failure], {"a": expert})
    cut = pair.rejected
    assert cut.num_turns == 7 and cut.info["truncated_from_turns"] == 12
    # The cut ends on the 7th agent turn's last token and keeps every token before it unchanged.
    assert cut.model_mask[-1] == 1 and cut.turn_index[-1] == 6
    assert np.array_equal(cut.token_ids, failure.token_ids[: len(cut.token_ids)])
    assert sum(m["role"] == "assistant" for m in cut.messages) == 7 and cut.messages[-1]["role"] == "assistant"
    (whole,) = eto_pairs([failure], {"a": expert}, extra_turns=None)
    assert whole.rejected is failure
    assert truncate_turns(expert, 5) is expert  # nothing to cut
    with pytest.raises(ValueError, match="turns=0 must be >= 1"):
        truncate_turns(expert, 0)


def test_pair_sides_end_at_their_last_sampled_token():
    """A side that ends with tokens the model never sampled (a context overflow's closing end-of-turn token) is cut
    after its last sampled one: those tokens weigh nothing in DPO but would lengthen the padded batch."""
    overflowed = episode("a", 1.0, 2)
    overflowed = Trajectory(np.append(overflowed.token_ids, [9, 9]).astype(np.int32),
                            np.append(overflowed.model_mask, [0, 0]).astype(np.int8),
                            np.append(overflowed.sample_logprobs, [0, 0]).astype(np.float32),
                            np.append(overflowed.turn_index, [-1, -1]).astype(np.int32), 1.0, 0, 0, "a", {})
    (pair,) = eto_pairs([overflowed], {"a": episode("a", 0.5, 2)})
    assert pair.chosen.model_mask[-1] == 1 and len(pair.chosen.token_ids) == len(overflowed.token_ids) - 2


def test_pair_batch_puts_chosen_first_and_pads_invalid_pairs():
    pairs = eto_pairs([episode("a", 0.0, 3, action=20)], {"a": episode("a", 1.0, 2)})
    ref = [(np.full(len(pairs[0].chosen.token_ids), -1.0), np.full(len(pairs[0].rejected.token_ids), -2.0))]
    batch = pair_batch(pairs, rows=2, ref_logprobs=ref)
    assert batch.tokens_Px2xT.shape[:2] == (2, 2) and batch.valid_P.tolist() == [1.0, 0.0]
    n_chosen, n_rejected = len(pairs[0].chosen.token_ids), len(pairs[0].rejected.token_ids)
    assert np.array_equal(batch.tokens_Px2xT[0, 0, :n_chosen], pairs[0].chosen.token_ids)
    assert np.array_equal(batch.model_mask_Px2xT[0, 1, :n_rejected], pairs[0].rejected.model_mask)
    assert batch.ref_logprobs_Px2xT[0, 0, :n_chosen].tolist() == [-1.0] * n_chosen
    assert batch.ref_logprobs_Px2xT[0, 1, n_rejected:].tolist() == [0.0] * (batch.tokens_Px2xT.shape[2] - n_rejected)
    assert batch.segment_ids_Px2xT[1].sum() == 0  # the padding pair holds nothing


def _policy_pairs(rollouts):
    """Pairs of the rollouts fixture's real AppTown records: per task, the reward-1 rollout against the others."""
    _, _, _, trajectories = rollouts
    experts = {t.task_id: t for t in trajectories if t.reward == 1.0}
    return eto_pairs([t for t in trajectories if t.reward < 1.0], experts, extra_turns=None)


@pytest.mark.parametrize("parameterisation", ["full", "lora"])
def test_dpo_starts_at_log_2_against_the_iterations_start_policy_with_the_closed_form_gradient(
        rollouts, parameterisation):
    setup, policy, _, _ = rollouts
    model, beta = setup.model, 0.1
    lora = LoraConfig(rank=4, alpha=8.0) if parameterisation == "lora" else None
    if lora is None:
        trainable, frozen = {"params": policy.params}, {}
    else:
        # Adapters far from zero: a reference that switched them off (the base model) would differ from the policy.
        _, adapters = init_params(model, jax.random.key(5), lora)
        leaves, tree = jax.tree.flatten(adapters)
        keys = jax.random.split(jax.random.key(6), len(leaves))
        adapters = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                             for k, x in zip(keys, leaves)])
        trainable, frozen = {"lora": adapters}, {"params": policy.params}
    pairs = _policy_pairs(rollouts)
    assert len(pairs) == 4
    computer = LogprobComputer(model, lora, 1.0)
    start = lambda sides: computer(policy.params, trainable.get("lora"), None, sides, 8)[0]  # noqa: E731
    batch = jax.tree.map(jnp.asarray, with_reference(pairs, start, rows=4))
    loss_fn = make_loss_fn(model, LossConfig(kind="dpo", beta=beta), lora)

    # Every pair alone: the policy is its own reference, so each loss is -log sigmoid(0) = log 2.
    for i in range(len(pairs)):
        one = batch._replace(valid_P=jnp.asarray(np.eye(4, dtype=np.float32)[i]))
        total, (count, _) = loss_fn(trainable, frozen, one, jnp.int32(0), jax.random.key(0))
        assert float(count) == 1.0 and abs(float(total) - math.log(2.0)) < 1e-6, i

    # The gradient of the mean loss: d(-log sigmoid(beta m))/dm = -beta sigmoid(-beta m) = -beta / 2 at m = 0, so it
    # is -beta / (2 P) times the gradient of the summed agent-token log-probs, chosen minus rejected.
    def loss_mean(t):
        total, (count, _) = loss_fn(t, frozen, batch, jnp.int32(0), jax.random.key(0))
        return total / count

    def summed_margin(t):
        pairs_, _, steps = batch.tokens_Px2xT.shape
        logp, _ = sequence_logprobs(t.get("params", frozen.get("params")), model,
                                    batch.tokens_Px2xT.reshape(-1, steps), batch.segment_ids_Px2xT.reshape(-1, steps),
                                    t.get("lora"), lora, 1.0, 512)
        side = jnp.sum(jnp.where(batch.model_mask_Px2xT > 0, logp.reshape(pairs_, 2, steps), 0.0), axis=2)
        return jnp.sum((side[:, 0] - side[:, 1]) * batch.valid_P)

    coefficient = -beta * (1.0 / (1.0 + np.exp(0.0))) / len(pairs)  # -beta sigmoid(-0) / P
    got, want = jax.grad(loss_mean)(trainable), jax.grad(summed_margin)(trainable)
    scale = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want)) * abs(coefficient)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), coefficient * np.asarray(w), atol=1e-5 * scale, rtol=1e-4)
    assert scale > 0
