"""Losses: pure functions of per-token log-probs, masks and per-trajectory scalars. No I/O, no config objects.

Every loss returns `(total, count)`: the sum of its per-unit losses and the number of units (trajectories, tokens or
pairs) it is a mean over. The loss is total / count; keeping the two apart lets the update step accumulate
micro-batches exactly (sum the totals and counts, divide once).

Shapes: N trajectories (or P pairs), T tokens. `logp_*_NxT[n, t]` is the log-probability of token t given the
tokens before it; `model_mask_NxT` is 1 on tokens the policy sampled; `turn_index_NxT` numbers the agent turns
(0, 1, ...; any value on non-model tokens).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxagent.errors import lookup
from jaxagent.models.config import accumulation_dtype


def _wide(x: jax.Array) -> jax.Array:
    """At least float32 (bfloat16 log-probs and integer masks), float64 for a float64 model."""
    return x.astype(accumulation_dtype(x.dtype))


def _masked(values: jax.Array, mask: jax.Array) -> jax.Array:
    """`values` where `mask` is set, else 0, selected rather than multiplied: a masked value that is inf or NaN
    (an environment token's log-ratio of 1,000 overflows exp) can never reach a sum or its gradient."""
    return jnp.where(mask > 0, values, 0.0)


# Ratio bounds [low, high] by clip mode: LOOP's code [1/(1+eps), 1+eps], or PPO's [1-eps, 1+eps].
CLIP_BOUNDS: dict[str, Callable[[float], tuple[float, float]]] = {
    "asymmetric": lambda epsilon: (1.0 / (1.0 + epsilon), 1.0 + epsilon),
    "symmetric": lambda epsilon: (1.0 - epsilon, 1.0 + epsilon),
}


def clip_bounds(epsilon: float, clip: str) -> tuple[float, float]:
    """Ratio bounds: LOOP's code [1/(1+eps), 1+eps] (`asymmetric`) or PPO's [1-eps, 1+eps] (`symmetric`)."""
    return lookup(CLIP_BOUNDS, clip, "clip mode")(epsilon)


def clipped_objective(ratio: jax.Array, advantage: jax.Array, low: float, high: float) -> jax.Array:
    """PPO's pessimistic objective min(r·A, clip(r, low, high)·A)."""
    return jnp.minimum(ratio * advantage, jnp.clip(ratio, low, high) * advantage)


def turn_sums(values_NxT: jax.Array, model_mask_NxT: jax.Array, turn_index_NxT: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    """Per (trajectory, turn): the sum of `values` over the turn's model tokens and the token count; [N, T] each
    (turn k in column k; turns are numbered below T)."""
    n, t = values_NxT.shape
    mask = _wide(model_mask_NxT)
    turn = jnp.clip(turn_index_NxT, 0, t - 1)
    segment = (jnp.arange(n)[:, None] * t + turn).reshape(-1)
    sums = jax.ops.segment_sum(_masked(values_NxT, mask).reshape(-1), segment, num_segments=n * t).reshape(n, t)
    counts = jax.ops.segment_sum(mask.reshape(-1), segment, num_segments=n * t).reshape(n, t)
    return sums, counts


def _token_mean(values_NxT: jax.Array, mask_NxT: jax.Array) -> jax.Array:
    """Per trajectory, the mean of `values` over its model tokens (0 for a trajectory without any)."""
    return jnp.sum(_masked(values_NxT, mask_NxT), axis=1) / jnp.maximum(jnp.sum(mask_NxT, axis=1), 1.0)


def _per_token(advantages: jax.Array, mask_NxT: jax.Array) -> jax.Array:
    """[N, T] advantages from [N] (one per trajectory) or [N, T] (per token)."""
    if advantages.ndim == 2:
        return _wide(advantages)
    return jnp.broadcast_to(_wide(advantages)[:, None], mask_NxT.shape)


def _per_trajectory(advantages: jax.Array, level: str) -> jax.Array:
    if advantages.ndim == 2:
        raise ValueError(f"ratio_level={level!r} needs one advantage per trajectory, got shape {advantages.shape}")
    return _wide(advantages)


def _objective_without_ratio(new, old, mask, advantages, turns, low, high):
    """REINFORCE / RLOO: A·log π per token, mean over model tokens."""
    return _token_mean(_per_token(advantages, mask) * new, mask)


def _objective_per_token(new, old, mask, advantages, turns, low, high):
    """LOOP: r_t = exp(new_t - old_t) clipped per token, mean over model tokens."""
    per_token = clipped_objective(jnp.exp(_masked(new - old, mask)), _per_token(advantages, mask), low, high)
    return _token_mean(per_token, mask)


def _objective_per_trajectory(new, old, mask, advantages, turns, low, high):
    """"Bandit": one ratio for the whole trajectory, the product of its tokens' ratios."""
    ratio = jnp.exp(jnp.sum(_masked(new - old, mask), axis=1))
    return clipped_objective(ratio, _per_trajectory(advantages, "trajectory"), low, high)


def _objective_per_turn(new, old, mask, advantages, turns, low, high):
    """One ratio per agent turn (the product over its tokens), mean over the trajectory's turns."""
    adv = _per_trajectory(advantages, "turn")
    if turns is None:
        raise ValueError("ratio_level='turn' needs turn_index_NxT")
    log_ratio, counts = turn_sums(new - old, mask, turns)
    present = counts > 0
    per_turn = clipped_objective(jnp.exp(log_ratio), adv[:, None], low, high)
    return jnp.sum(jnp.where(present, per_turn, 0.0), axis=1) / jnp.maximum(jnp.sum(present, axis=1), 1)


# Per-trajectory objectives by importance-ratio level: (new, old, mask, advantages, turns, low, high) -> [N].
RATIO_OBJECTIVES: dict[str, Callable[..., jax.Array]] = {
    "token": _objective_per_token,
    "turn": _objective_per_turn,
    "trajectory": _objective_per_trajectory,
    "none": _objective_without_ratio,
}


def policy_loss(logp_new_NxT: jax.Array, logp_old_NxT: jax.Array, model_mask_NxT: jax.Array,
                advantages: jax.Array, turn_index_NxT: jax.Array | None = None, *, epsilon: float = 0.1,
                clip: str = "asymmetric", ratio_level: str = "token", ref_logp_NxT: jax.Array | None = None,
                kl_coef: float = 0.0, valid_N: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Clipped policy-gradient loss, averaged per trajectory then over trajectories (LOOP, GRPO, PPO, RLOO).

    `advantages` is [N] (one value per trajectory, applied to all its tokens) or [N, T] (per token, e.g. GAE).
    ratio_level: `token` (LOOP: r_t = exp(new_t - old_t), mean over model tokens), `turn` (r = product over a
    turn's tokens, mean over turns), `trajectory` (one ratio for the whole trajectory: "bandit"), `none` (REINFORCE:
    -A·log π, mean over model tokens). With `kl_coef`, GRPO's k3 estimator exp(ref-new) - (ref-new) - 1 to a
    reference policy, averaged over model tokens, is added to each trajectory's loss.
    """
    objective_fn = lookup(RATIO_OBJECTIVES, ratio_level, "ratio level")
    low, high = clip_bounds(epsilon, clip)
    mask = _wide(model_mask_NxT)
    has_tokens = jnp.sum(mask, axis=1) > 0
    valid = has_tokens if valid_N is None else has_tokens & valid_N.astype(bool)
    new = _wide(logp_new_NxT)
    loss = -objective_fn(new, _wide(logp_old_NxT), mask, advantages, turn_index_NxT, low, high)
    if kl_coef:
        if ref_logp_NxT is None:
            raise ValueError("kl_coef > 0 needs ref_logp_NxT")
        log_ref_over_new = _masked(_wide(ref_logp_NxT) - new, mask)
        k3 = jnp.exp(log_ref_over_new) - log_ref_over_new - 1.0
        loss = loss + kl_coef * jnp.sum(_masked(k3, mask), axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return jnp.sum(jnp.where(valid, loss, 0.0)), jnp.sum(valid).astype(jnp.float32)


def value_loss(values_NxT: jax.Array, returns_NxT: jax.Array, model_mask_NxT: jax.Array,
               valid_N: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """0.5·(V - return)² on model tokens with V clipped to [0, 1] (rewards lie in [0, 1]), mean per trajectory."""
    mask = _wide(model_mask_NxT)
    tokens = jnp.sum(mask, axis=1)
    valid = tokens > 0 if valid_N is None else (tokens > 0) & valid_N.astype(bool)
    error = jnp.clip(_wide(values_NxT), 0.0, 1.0) - _wide(returns_NxT)
    per_traj = jnp.sum(_masked(0.5 * error**2, mask), axis=1) / jnp.maximum(tokens, 1.0)
    return jnp.sum(jnp.where(valid, per_traj, 0.0)), jnp.sum(valid).astype(jnp.float32)


def sft_loss(logp_NxT: jax.Array, model_mask_NxT: jax.Array, weights_N: jax.Array | None = None,
             per: str = "token") -> tuple[jax.Array, jax.Array]:
    """Behaviour cloning: negative log-likelihood of model tokens, a mean over all tokens of the batch (`token`) or
    a mean per trajectory then over trajectories (`trajectory`). `weights_N` (0/1) is the keep filter of
    rejection fine-tuning / expert iteration."""
    mask = _wide(model_mask_NxT)
    if weights_N is not None:
        mask = mask * _wide(weights_N)[:, None]
    nll = _masked(-_wide(logp_NxT), mask)
    if per == "token":
        return jnp.sum(nll), jnp.sum(mask)
    if per == "trajectory":
        tokens = jnp.sum(mask, axis=1)
        kept = tokens > 0
        return jnp.sum(jnp.where(kept, jnp.sum(nll, axis=1) / jnp.maximum(tokens, 1.0), 0.0)), jnp.sum(
            kept).astype(jnp.float32)
    raise ValueError(f"unknown sft normalisation {per!r}; valid: token, trajectory")


def dpo_loss(logp_chosen_PxT: jax.Array, mask_chosen_PxT: jax.Array, ref_chosen_PxT: jax.Array,
             logp_rejected_PxT: jax.Array, mask_rejected_PxT: jax.Array, ref_rejected_PxT: jax.Array, *,
             beta: float = 0.1, nll_coef: float = 0.0, valid_P: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """DPO on pairs: -log σ(β[(log π_c - log ref_c) - (log π_r - log ref_r)]), sequence log-probs summed over the
    agent's tokens (ETO; SWEET-RL's turn-level step with one action per side). `nll_coef` adds that multiple of the
    chosen side's mean per-token NLL (SWEET-RL: 0.01)."""
    mask_c, mask_r = _wide(mask_chosen_PxT), _wide(mask_rejected_PxT)
    chosen = jnp.sum(_masked(_wide(logp_chosen_PxT) - _wide(ref_chosen_PxT), mask_c), axis=1)
    rejected = jnp.sum(_masked(_wide(logp_rejected_PxT) - _wide(ref_rejected_PxT), mask_r), axis=1)
    loss = -jax.nn.log_sigmoid(beta * (chosen - rejected))
    if nll_coef:
        tokens = jnp.maximum(jnp.sum(mask_c, axis=1), 1.0)
        loss = loss + nll_coef * (-jnp.sum(_masked(_wide(logp_chosen_PxT), mask_c), axis=1) / tokens)
    valid = jnp.ones(loss.shape, bool) if valid_P is None else valid_P.astype(bool)
    return jnp.sum(jnp.where(valid, loss, 0.0)), jnp.sum(valid).astype(jnp.float32)


def _trajectory_mean_score(log_ratio_NxT, model_mask_NxT, turn_index_NxT):
    """The public code: one mean of the log-ratio over all the trajectory's agent tokens."""
    mask = _wide(model_mask_NxT)
    return jnp.sum(_masked(log_ratio_NxT, mask), axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def _turn_sum_score(log_ratio_NxT, model_mask_NxT, turn_index_NxT):
    """The paper: the sum over turns of the turn advantage, the mean log-ratio over the turn's tokens."""
    if turn_index_NxT is None:
        raise ValueError("score='turn_sum' needs turn_index_NxT")
    sums, counts = turn_sums(log_ratio_NxT, model_mask_NxT, turn_index_NxT)
    return jnp.sum(jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0), axis=1)


CRITIC_SCORES: dict[str, Callable[..., jax.Array]] = {
    "trajectory_mean": _trajectory_mean_score,
    "turn_sum": _turn_sum_score,
}


def critic_scores(critic_logp_NxT: jax.Array, ref_logp_NxT: jax.Array, model_mask_NxT: jax.Array,
                  turn_index_NxT: jax.Array | None = None, score: str = "trajectory_mean") -> jax.Array:
    """SWEET-RL's trajectory score from the critic's per-token log-ratio to its frozen copy, [N]
    (`turn_sum`: the paper's sum of per-turn means; `trajectory_mean`: the public code's one mean)."""
    score_fn = lookup(CRITIC_SCORES, score, "critic score")
    return score_fn(_wide(critic_logp_NxT) - _wide(ref_logp_NxT), model_mask_NxT, turn_index_NxT)


def turn_advantages(critic_logp_NxT: jax.Array, ref_logp_NxT: jax.Array, model_mask_NxT: jax.Array,
                    turn_index_NxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SWEET-RL's A(o_t, a_t, c) per turn: mean log-ratio over the turn's tokens; returns ([N, T], present mask)."""
    sums, counts = turn_sums(_wide(critic_logp_NxT) - _wide(ref_logp_NxT), model_mask_NxT, turn_index_NxT)
    return sums / jnp.maximum(counts, 1.0), counts > 0


def bradley_terry_loss(critic_chosen_PxT: jax.Array, ref_chosen_PxT: jax.Array, mask_chosen_PxT: jax.Array,
                       critic_rejected_PxT: jax.Array, ref_rejected_PxT: jax.Array, mask_rejected_PxT: jax.Array,
                       turn_chosen_PxT: jax.Array | None = None, turn_rejected_PxT: jax.Array | None = None, *,
                       beta: float = 0.1, score: str = "trajectory_mean", valid_P: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """SWEET-RL critic loss over pairs of the same task, τ+ with the higher reward: -log σ(β·S(τ+) - β·S(τ-))."""
    better = critic_scores(critic_chosen_PxT, ref_chosen_PxT, mask_chosen_PxT, turn_chosen_PxT, score)
    worse = critic_scores(critic_rejected_PxT, ref_rejected_PxT, mask_rejected_PxT, turn_rejected_PxT, score)
    loss = -jax.nn.log_sigmoid(beta * better - beta * worse)
    valid = jnp.ones(loss.shape, bool) if valid_P is None else valid_P.astype(bool)
    return jnp.sum(jnp.where(valid, loss, 0.0)), jnp.sum(valid).astype(jnp.float32)
