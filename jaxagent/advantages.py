"""Advantage estimators and trajectory filters: pure functions of rewards, groups and masks.

Shapes: N trajectories, T tokens. A group is the set of rollouts of one task (`group_ids_N`); groups may have
different sizes and ids need not be contiguous (they must be < N, e.g. indices into the round's task list).
`valid_N` marks real trajectories (padding rows are 0 and get advantage 0).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxagent.errors import lookup


def _group_stats(values_N: jax.Array, group_ids_N: jax.Array, valid_N: jax.Array):
    """Per trajectory: the sum and count of its group's valid values."""
    num_groups = values_N.shape[0]
    weights = valid_N.astype(jnp.float32)
    sums = jax.ops.segment_sum(values_N * weights, group_ids_N, num_segments=num_groups)
    counts = jax.ops.segment_sum(weights, group_ids_N, num_segments=num_groups)
    return sums[group_ids_N], counts[group_ids_N]


def _valid(rewards_N: jax.Array, valid_N: jax.Array | None) -> jax.Array:
    return jnp.ones_like(rewards_N, bool) if valid_N is None else valid_N.astype(bool)


def leave_one_out(rewards_N: jax.Array, group_ids_N: jax.Array, valid_N: jax.Array | None = None) -> jax.Array:
    """LOOP/RLOO: A_i = R_i - mean of the other rollouts of the same task (0 for a rollout alone in its group)."""
    valid = _valid(rewards_N, valid_N)
    rewards = rewards_N.astype(jnp.float32)
    sums, counts = _group_stats(rewards, group_ids_N, valid)
    others = jnp.maximum(counts - 1.0, 1.0)
    advantage = rewards - (sums - rewards) / others
    return jnp.where(valid & (counts > 1), advantage, 0.0)


def group_mean(rewards_N: jax.Array, group_ids_N: jax.Array, valid_N: jax.Array | None = None) -> jax.Array:
    """A_i = R_i - mean of its group (the rollout itself included)."""
    valid = _valid(rewards_N, valid_N)
    rewards = rewards_N.astype(jnp.float32)
    sums, counts = _group_stats(rewards, group_ids_N, valid)
    return jnp.where(valid, rewards - sums / jnp.maximum(counts, 1.0), 0.0)


def group_std(rewards_N: jax.Array, group_ids_N: jax.Array, valid_N: jax.Array | None = None,
              ddof: int = 1) -> jax.Array:
    """Standard deviation of each trajectory's group rewards (ddof=1: the unbiased estimate, as torch.std)."""
    valid = _valid(rewards_N, valid_N)
    rewards = rewards_N.astype(jnp.float32)
    sums, counts = _group_stats(rewards, group_ids_N, valid)
    mean = sums / jnp.maximum(counts, 1.0)
    squares, _ = _group_stats((rewards - mean) ** 2, group_ids_N, valid)
    return jnp.sqrt(squares / jnp.maximum(counts - ddof, 1.0))


def grpo_advantages(rewards_N: jax.Array, group_ids_N: jax.Array, valid_N: jax.Array | None = None) -> jax.Array:
    """GRPO (DeepSeekMath, arXiv 2402.03300): A_i = (R_i - mean(R)) / std(R) over the group. The paper does not say
    which std; this is its common reference implementation's (TRL's GRPOTrainer): the sample std (ddof 1) + 1e-4."""
    std = group_std(rewards_N, group_ids_N, valid_N, ddof=1)
    return group_mean(rewards_N, group_ids_N, valid_N) / (std + 1e-4)


def leave_one_out_normalized(rewards_N: jax.Array, group_ids_N: jax.Array, valid_N: jax.Array | None = None
                             ) -> jax.Array:
    """LOOP's "RwNorm" ablation as apple/ml-loop computes it: the leave-one-out advantage divided by the group's
    population std (NumPy's np.std, ddof 0) floored at 1e-7 (a group whose rewards tie gets advantage 0)."""
    std = group_std(rewards_N, group_ids_N, valid_N, ddof=0)
    return leave_one_out(rewards_N, group_ids_N, valid_N) / jnp.maximum(std, 1e-7)


def keep_informative(advantages_N: jax.Array, threshold: float = 0.01,
                     valid_N: jax.Array | None = None) -> jax.Array:
    """LOOP's filter: keep rollouts with |A| >= threshold (a group whose rollouts all tie teaches nothing)."""
    return _valid(advantages_N, valid_N) & (jnp.abs(advantages_N) >= threshold)


def keep_for_finetuning(rewards_N: jax.Array, group_ids_N: jax.Array, mode: str = "success",
                        threshold: float = 1.0, valid_N: jax.Array | None = None) -> jax.Array:
    """Which rollouts rejection fine-tuning trains on.

    `success`: every rollout with reward >= threshold (RFT). `best_of_group`: per task, the first rollout with the
    group's highest reward, if that reward >= threshold (expert iteration).
    """
    valid = _valid(rewards_N, valid_N)
    good = valid & (rewards_N >= threshold)
    if mode == "success":
        return good
    if mode != "best_of_group":
        raise ValueError(f"unknown finetuning filter {mode!r}; valid: success, best_of_group")
    n = rewards_N.shape[0]
    masked = jnp.where(valid, rewards_N.astype(jnp.float32), -jnp.inf)
    best = jax.ops.segment_max(masked, group_ids_N, num_segments=n)[group_ids_N]
    is_best = good & (masked == best)
    # Ties: the lowest index of the group wins.
    index = jnp.where(is_best, jnp.arange(n), n)
    first = jax.ops.segment_min(index, group_ids_N, num_segments=n)[group_ids_N]
    return is_best & (jnp.arange(n) == first)


def gae(token_rewards_NxT: jax.Array, values_NxT: jax.Array, model_mask_NxT: jax.Array, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over model tokens only; returns (advantages, returns), both [N, T].

    Environment tokens are skipped, not treated as steps: the value after a model token is the value of the next
    model token (0 after the last), so an observation between two turns does not break the recursion.
    Non-model tokens get advantage and return 0.
    """
    mask = model_mask_NxT.astype(bool)
    rewards = token_rewards_NxT.astype(jnp.float32)
    values = values_NxT.astype(jnp.float32)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, is_model = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(is_model, value, next_value), jnp.where(is_model, advantage, next_advantage))
        return carry, jnp.where(is_model, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, advantages_TxN = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = advantages_TxN.T
    return advantages, jnp.where(mask, advantages + values, 0.0)


def terminal_rewards(rewards_N: jax.Array, model_mask_NxT: jax.Array) -> jax.Array:
    """[N, T] token rewards: each trajectory's reward on its last model token, 0 elsewhere."""
    mask = model_mask_NxT.astype(bool)
    steps = mask.shape[1]
    last = steps - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    has_model = jnp.any(mask, axis=1)
    onehot = (jnp.arange(steps)[None, :] == last[:, None]) & has_model[:, None]
    return jnp.where(onehot, rewards_N[:, None].astype(jnp.float32), 0.0)


# Trajectory-level estimators by name, so that an ablation is a configuration key.
ADVANTAGES: dict[str, Callable[..., jax.Array]] = {
    "leave_one_out": leave_one_out,
    "group_mean": group_mean,
    "group_norm": grpo_advantages,
    "leave_one_out_norm": leave_one_out_normalized,
    "reward": lambda rewards, groups, valid=None: jnp.where(_valid(rewards, valid), rewards, 0.0),  # REINFORCE
    "none": lambda rewards, groups, valid=None: jnp.zeros_like(rewards),  # imitation: kept rollouts as they are
}


def get_advantage(name: str) -> Callable[..., jax.Array]:
    """The trajectory-level advantage estimator called `name`."""
    return lookup(ADVANTAGES, name, "advantage estimator")
