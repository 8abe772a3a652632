"""LOOP and its policy-gradient siblings: one iteration is

    tasks (grain) -> K rollouts per task -> advantages -> filter -> shuffle -> E epochs of minibatch updates.

The algorithms differ only in the advantage estimator, which rollouts are kept, and the loss (GUIDE §3):

    loop       leave-one-out A_i = R_i - mean_{j!=i} R_j; drop |A| < 0.01; per-token clipped ratio (LOOP)
    rloo       leave-one-out, drop |A| < 0.01; no importance ratio (REINFORCE with the leave-one-out baseline)
    grpo       (R_i - mean) / std of the group; clipped per-token ratio; optional k3 KL to the base policy
    reinforce  A_i = R_i; no ratio
    ppo        GAE (gamma = lambda = 1) from a learned value head; clipped per-token ratio; value loss
    ei         expert iteration: imitate the best rollout of each task when it succeeds (SFT loss)

Old log-probs are recomputed by the learner before the first epoch; their mismatch with the sampler's is logged.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxagent import advantages as adv
from jaxagent.algorithms.batching import LENGTH_BUCKETS, LogprobComputer, minibatches, per_token_rows, sequence_batch
from jaxagent.algorithms.common import (
    IterationLoop,
    PolicyParams,
    Setup,
    eval_seed,
    evaluate,
    key_from_json,
    key_to_json,
)
from jaxagent.config import LoopSection
from jaxagent.data import TaskBatches
from jaxagent.envs.base import list_tasks
from jaxagent.metrics import rollout_stats
from jaxagent.models.heads import init_value_head
from jaxagent.rollout import collect
from jaxagent.trajectory import Trajectory, pad_trajectories
from jaxagent.update import LossConfig, UpdateConfig, check_nonfinite, init_train_state, make_update_step


@dataclasses.dataclass(frozen=True)
class Algorithm:
    advantage: str  # leave_one_out | group_norm | reward | gae | none
    filter_small: bool  # drop rollouts with |A| < min_abs_advantage
    ratio_level: str | None  # None: the config's loop.ratio_level
    loss: str = "policy"


ALGORITHMS = {
    "loop": Algorithm("leave_one_out", True, None),
    "rloo": Algorithm("leave_one_out", True, "none"),
    "grpo": Algorithm("group_norm", True, None),
    "reinforce": Algorithm("reward", False, "none"),
    "ppo": Algorithm("gae", False, None),
    "ei": Algorithm("none", False, None, loss="sft"),
}


def loss_config(name: str, loop: LoopSection, updates_per_iteration: int, temperature: float) -> LossConfig:
    algorithm = ALGORITHMS[name]
    if algorithm.loss == "sft":
        return LossConfig(kind="sft", sft_per="trajectory", temperature=temperature)
    return LossConfig(kind="policy", epsilon=loop.epsilon, clip=loop.clip,
                      ratio_level=algorithm.ratio_level or loop.ratio_level, kl_coef=loop.kl_coef,
                      value_coef=loop.value_coef if name == "ppo" else 0.0,
                      value_coef_end=loop.value_coef_end if name == "ppo" else 0.0,
                      value_coef_steps=max(loop.iterations * updates_per_iteration, 1), temperature=temperature)


def trajectory_advantages(name: str, trajectories: list[Trajectory], loop: LoopSection
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(advantage per trajectory, keep weight per trajectory) for the trajectory-level algorithms."""
    rewards = jnp.asarray([t.reward for t in trajectories], jnp.float32)
    groups = jnp.asarray([t.group_id for t in trajectories], jnp.int32)
    algorithm = ALGORITHMS[name]
    if name == "ei":
        keep = adv.keep_for_finetuning(rewards, groups, mode=loop.ei_filter)
        return np.zeros(len(trajectories), np.float32), np.asarray(keep, np.float32)
    if algorithm.advantage == "reward":
        values = rewards
    else:
        values = adv.get_advantage(algorithm.advantage)(rewards, groups)
    keep = adv.keep_informative(values, loop.min_abs_advantage) if algorithm.filter_small else jnp.ones_like(values)
    return np.asarray(values, np.float32), np.asarray(keep, np.float32)


def run(setup: Setup, stage_index: int, name: str, policy: PolicyParams) -> tuple[PolicyParams, dict]:
    """`loop.iterations` iterations of the algorithm `name`; returns the policy and its held-out evaluation."""
    config, loop_cfg = setup.config, setup.config.loop
    rollouts = loop_cfg.tasks_per_iteration * loop_cfg.rollouts_per_task
    updates = loop_cfg.epochs * math.ceil(rollouts / loop_cfg.minibatch_size)
    temperature = config.rollout.temperature
    update_config = UpdateConfig(loss_config(name, loop_cfg, updates, temperature), config.optim,
                                 micro_batches=loop_cfg.micro_batches)
    update = make_update_step(setup.model, update_config, setup.lora)
    logprobs = LogprobComputer(setup.model, setup.lora, temperature)
    frozen = policy.frozen()
    trainable = policy.trainable()
    if name == "ppo":
        trainable["value_head"] = init_value_head(setup.model)
    loop = IterationLoop(setup, stage_index, name, loop_cfg.iterations, config.checkpoint.every)
    train_tasks = list_tasks(config.env.name, config.env.train_split, config.env.options)
    batches = TaskBatches(train_tasks, loop_cfg.tasks_per_iteration, seed=config.seed + stage_index)
    state, meta, start = loop.resume(init_train_state(trainable, update_config))
    rng = key_from_json(meta["rng"]) if meta else jax.random.fold_in(jax.random.key(config.seed), stage_index)
    if meta:
        batches.set_state(meta["data"])
    try:
        for iteration in loop.progress(start):
            rng, rollout_key, update_key = jax.random.split(rng, 3)
            current = PolicyParams.from_state(state, frozen)
            tasks = next(batches)
            trajectories = collect(setup.sampler, current.params, setup.renderer, setup.make_env, tasks,
                                   loop_cfg.rollouts_per_task, config.rollout, rollout_key, current.lora_params)
            state, stats = _learn(name, state, frozen, trajectories, logprobs, update, update_config, loop_cfg,
                                  iteration, np.random.default_rng([config.seed, stage_index, iteration]),
                                  update_key)
            loop.show(reward=stats["reward"], success=stats["success"])
            loop.log(iteration, "train", stats)
            if iteration % config.eval.every == 0 or iteration == loop_cfg.iterations:
                eval_stats, _ = evaluate(setup, PolicyParams.from_state(state, frozen),
                                         seed=eval_seed(config, stage_index, iteration))
                loop.log(iteration, "eval", eval_stats)
                loop.show(reward=stats["reward"], eval_success=eval_stats["success"])
            loop.maybe_checkpoint(iteration, state, {"rng": key_to_json(rng), "data": batches.get_state()})
    finally:
        loop.close()
    return PolicyParams.from_state(state, frozen), loop.last_eval()


def _learn(name, state, frozen, trajectories, logprobs, update, update_config, loop_cfg, iteration, shuffle_rng,
           key):
    """Advantages, filter and the epochs of minibatch updates of one iteration; returns (state, statistics)."""
    stats = rollout_stats(trajectories)
    per_token = None
    if name == "ppo":
        values, keep, per_token, returns = _ppo_targets(state, frozen, trajectories, logprobs, loop_cfg, iteration)
    else:
        values, keep = trajectory_advantages(name, trajectories, loop_cfg)
        returns = None
    kept = [i for i in range(len(trajectories)) if keep[i] > 0]
    stats.update(kept=len(kept), advantage_abs_mean=float(np.mean(np.abs(values))) if len(values) else 0.0)
    if not kept:
        return state, stats
    chosen = [trajectories[i] for i in kept]
    current = PolicyParams.from_state(state, frozen)
    old, _ = logprobs(current.params, current.lora_params, None, chosen, loop_cfg.minibatch_size)
    mismatch = [np.abs(o - t.sample_logprobs)[t.model_mask.astype(bool)] for o, t in zip(old, chosen)]
    stats["sampler_learner_logprob_mismatch_max"] = float(max((m.max() for m in mismatch if m.size), default=0.0))
    step_metrics = []
    for epoch in range(loop_cfg.epochs):
        for part in minibatches(len(chosen), loop_cfg.minibatch_size, shuffle_rng):
            rows = [chosen[i] for i in part]
            batch = sequence_batch(rows, advantages=[values[kept[i]] for i in part], rows=loop_cfg.minibatch_size,
                                   old_logprobs=[old[i] for i in part],
                                   token_advantages=None if per_token is None else [per_token[kept[i]]
                                                                                    for i in part],
                                   returns=None if returns is None else [returns[kept[i]] for i in part])
            key, step_key = jax.random.split(key)
            state, metrics = update(state, frozen, batch, step_key)
            check_nonfinite(state, metrics, update_config.max_nonfinite_in_row)
            step_metrics.append({k: float(v) for k, v in metrics.items()})
    for key_name in ("loss", "grad_norm", "ratio_mean", "approx_kl", "clipped_fraction"):
        values_seen = [m[key_name] for m in step_metrics if key_name in m]
        if values_seen:
            stats[key_name] = float(np.mean(values_seen))
    stats["updates"] = len(step_metrics)
    return state, stats


def _ppo_targets(state, frozen, trajectories, logprobs, loop_cfg, iteration):
    """PPO: per-token GAE advantages (gamma = lambda = 1) and returns from the value head's estimates.

    During the critic warm-up the policy advantages are zero, so only the value head learns.
    """
    current = PolicyParams.from_state(state, frozen)
    _, values = logprobs(current.params, current.lora_params, state.trainable["value_head"], trajectories,
                         loop_cfg.minibatch_size)
    padded = pad_trajectories(trajectories, LENGTH_BUCKETS)
    count, length = padded["tokens"].shape
    mask = jnp.asarray(padded["model_mask"])
    token_rewards = adv.terminal_rewards(jnp.asarray(padded["reward"]), mask)
    advantages, returns = adv.gae(token_rewards, jnp.clip(jnp.asarray(per_token_rows(values, count, length)), 0.0, 1.0),
                                  mask)
    if iteration <= loop_cfg.critic_warmup_iterations:
        advantages = jnp.zeros_like(advantages)
    advantages, returns = np.asarray(advantages), np.asarray(returns)
    per_token = [advantages[i, :len(t.token_ids)] for i, t in enumerate(trajectories)]
    targets = [returns[i, :len(t.token_ids)] for i, t in enumerate(trajectories)]
    return np.zeros(len(trajectories), np.float32), np.ones(len(trajectories), np.float32), per_token, targets
