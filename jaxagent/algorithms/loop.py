"""LOOP and its policy-gradient siblings: one iteration is

    tasks (grain) -> K rollouts per task -> advantages -> filter -> shuffle -> E epochs of minibatch updates.

The algorithms differ only in their `ALGORITHMS` entry: the advantage estimator, which rollouts are kept, the
importance-ratio level, the loss and any extra head:

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
import logging
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxagent import advantages as adv
from jaxagent import distributed
from jaxagent.algorithms.batching import LogprobComputer, minibatches, per_token_rows, sequence_batch
from jaxagent.algorithms.common import (
    IterationLoop,
    PolicyParams,
    Setup,
    collect_groups,
    eval_seed,
    evaluate,
    key_from_json,
    key_to_json,
)
from jaxagent.config import LoopSection, shared_fields
from jaxagent.data import TaskBatches
from jaxagent.envs.registry import list_tasks
from jaxagent.errors import lookup
from jaxagent.metrics import rollout_stats
from jaxagent.models.heads import init_value_head
from jaxagent.trajectory import Trajectory, pad_trajectories, through_last_sample
from jaxagent.update import (
    LossConfig,
    TrainState,
    UpdateConfig,
    UpdateStep,
    check_nonfinite,
    init_train_state,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """How one member of the family turns rollouts into training rows."""

    advantage: str  # jaxagent.advantages.ADVANTAGES, or "gae" (per token, from the value head)
    keep: str  # which rollouts train: a KEEP_FILTERS entry
    ratio_level: str | None = None  # None: the config's loop.ratio_level
    loss: str = "policy"  # jaxagent.objectives.LOSSES ("sft": imitate each kept rollout, a mean per trajectory)
    heads: tuple[str, ...] = ()  # trained beside the policy: "value" (PPO's critic)


# Adding an algorithm is one entry here (and its name in jaxagent.choices.STAGES). A different advantage for the
# same algorithm is a setting instead: `loop.advantage` (e.g. leave_one_out_norm, LOOP's "RwNorm" ablation).
ALGORITHMS: dict[str, Algorithm] = {
    "loop": Algorithm("leave_one_out", "informative"),
    "grpo": Algorithm("group_norm", "informative"),
    "rloo": Algorithm("leave_one_out", "informative", ratio_level="none"),
    "ppo": Algorithm("gae", "all", heads=("value",)),
    "reinforce": Algorithm("reward", "all", ratio_level="none"),
    "ei": Algorithm("none", "finetune", loss="sft"),
}

# Which rollouts train, from (advantages, rewards, groups, loop section): 1 = kept.
KEEP_FILTERS: dict[str, Callable[..., jax.Array]] = {
    "informative": lambda values, rewards, groups, loop: adv.keep_informative(values, loop.min_abs_advantage),
    "all": lambda values, rewards, groups, loop: jnp.ones_like(values),
    "finetune": lambda values, rewards, groups, loop: adv.keep_for_finetuning(rewards, groups, mode=loop.ei_filter),
}


def get_algorithm(name: str) -> Algorithm:
    """The algorithm called `name`."""
    return lookup(ALGORITHMS, name, "algorithm")


class Targets(NamedTuple):
    """What an iteration trains towards, per rollout."""

    advantages: np.ndarray  # [N] one per trajectory (0 where token_advantages hold them)
    keep: np.ndarray  # [N] 1 = trained on
    token_advantages: list[np.ndarray] | None = None  # PPO: per token
    returns: list[np.ndarray] | None = None  # PPO: the value head's targets per token


@dataclasses.dataclass(frozen=True)
class RLStage:
    """One RL stage's algorithm and the pieces built from it for its iterations."""

    name: str
    algorithm: Algorithm
    loop: LoopSection
    update_config: UpdateConfig
    update: UpdateStep
    logprobs: LogprobComputer
    frozen: dict  # base weights under LoRA adapters ({} when every parameter trains)
    place: Callable = lambda batch: batch  # host batch -> where the update step wants it (Placement.batch)


def loss_config(name: str, loop: LoopSection, updates_per_iteration: int, temperature: float) -> LossConfig:
    """The loss of algorithm `name`, with the stage's clipping, ratio level, KL and value-loss settings."""
    algorithm = get_algorithm(name)
    settings = shared_fields(loop, LossConfig)
    if algorithm.ratio_level is not None:
        settings["ratio_level"] = algorithm.ratio_level
    if "value" not in algorithm.heads:
        settings.update(value_coef=0.0, value_coef_end=0.0)
    # A minibatch's summed rollout losses are divided by the configured minibatch size, as LOOP's reference does.
    return LossConfig(**settings, kind=algorithm.loss, sft_per="trajectory", temperature=temperature,
                      value_coef_steps=max(loop.iterations * updates_per_iteration, 1), denominator="rows")


def make_stage(setup: Setup, name: str, policy: PolicyParams) -> tuple[RLStage, TrainState]:
    """The RL stage `name` of this run (its loss, jitted update step and log-prob computer) and its fresh train
    state, placed where the update step wants it."""
    loop_cfg, temperature = setup.config.loop, setup.config.rollout.temperature
    rollouts = loop_cfg.tasks_per_iteration * loop_cfg.rollouts_per_task
    updates = loop_cfg.epochs * math.ceil(rollouts / loop_cfg.minibatch_size)
    update_config = UpdateConfig(loss_config(name, loop_cfg, updates, temperature), setup.config.optim,
                                 micro_batches=loop_cfg.micro_batches, kl_stop=loop_cfg.kl_stop)
    algorithm, frozen = get_algorithm(name), policy.frozen()
    fresh = init_train_state(trainable_of(algorithm, setup, policy), update_config)
    update, fresh = setup.placement.update_step(update_config, fresh, frozen)
    stage = RLStage(name, algorithm, loop_cfg, update_config, update,
                    LogprobComputer(setup.model, setup.lora, temperature, place=setup.placement.batch,
                                    fetch=setup.placement.fetch, pack=loop_cfg.pack), frozen,
                    setup.placement.batch)
    return stage, fresh


def trainable_of(algorithm: Algorithm, setup: Setup, policy: PolicyParams) -> dict:
    """The leaves the stage trains: the policy's (adapters or parameters) and its algorithm's extra heads."""
    trainable = policy.trainable()
    if "value" in algorithm.heads:
        trainable["value_head"] = init_value_head(setup.model)
    return trainable


def trajectory_advantages(name: str, trajectories: list[Trajectory], loop: LoopSection
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(advantage per trajectory, keep weight per trajectory) for the trajectory-level algorithms."""
    algorithm = get_algorithm(name)
    rewards = jnp.asarray([t.reward for t in trajectories], jnp.float32)
    groups = jnp.asarray([t.group_id for t in trajectories], jnp.int32)
    values = adv.get_advantage(loop.advantage or algorithm.advantage)(rewards, groups)
    keep = lookup(KEEP_FILTERS, algorithm.keep, "keep filter")(values, rewards, groups, loop)
    return np.asarray(values, np.float32), np.asarray(keep, np.float32)


def run(setup: Setup, stage_index: int, name: str, policy: PolicyParams) -> tuple[PolicyParams, dict]:
    """`loop.iterations` iterations of the algorithm `name`; returns the policy and its held-out evaluation."""
    config, loop_cfg = setup.config, setup.config.loop
    stage, fresh = make_stage(setup, name, policy)
    frozen = stage.frozen
    loop = IterationLoop(setup, stage_index, name, loop_cfg.iterations, config.checkpoint.every)
    train_tasks = list_tasks(config.env.name, config.env.train_split, config.env.options)
    batches = TaskBatches(train_tasks, loop_cfg.tasks_per_iteration, seed=config.seed + stage_index)
    state, meta, start = loop.resume(fresh)
    rng = key_from_json(meta["rng"]) if meta else jax.random.fold_in(jax.random.key(config.seed), stage_index)
    if meta:
        batches.set_state(meta["data"])
    distributed.agree((train_tasks, key_to_json(rng), batches.get_state()), "the tasks, RNG and data iterator")
    try:
        for iteration in loop.progress(start):
            rng, rollout_key, update_key = jax.random.split(rng, 3)
            current = PolicyParams.from_state(state, frozen)
            started = time.perf_counter()
            trajectories = collect_groups(setup, current, next(batches), loop_cfg.rollouts_per_task, config.rollout,
                                          rollout_key)
            rolled = time.perf_counter()
            state, stats = _learn(stage, state, trajectories, iteration,
                                  np.random.default_rng([config.seed, stage_index, iteration]), update_key)
            # Where an iteration's time goes: playing the episodes vs the learner's log-probs and updates.
            stats.update(rollout_s=round(rolled - started, 2), learn_s=round(time.perf_counter() - rolled, 2))
            loop.show(reward=stats["reward"], success=stats["success"])
            loop.log(iteration, "train", stats)
            if iteration % config.eval.every == 0 or iteration == loop_cfg.iterations:
                started = time.perf_counter()
                eval_stats, _ = evaluate(setup, PolicyParams.from_state(state, frozen),
                                         seed=eval_seed(config, stage_index, iteration))
                loop.log(iteration, "eval", {**eval_stats, "eval_s": round(time.perf_counter() - started, 2)})
                loop.show(reward=stats["reward"], eval_success=eval_stats["success"])
            loop.maybe_checkpoint(iteration, state, {"rng": key_to_json(rng), "data": batches.get_state()})
    finally:
        loop.close()
    return PolicyParams.from_state(state, frozen), loop.last_eval()


def targets(stage: RLStage, state: TrainState, trajectories: list[Trajectory], iteration: int) -> Targets:
    """Advantages (per trajectory, or per token from the value head) and which rollouts train."""
    if stage.algorithm.advantage == "gae":
        return _gae_targets(stage, state, trajectories, iteration)
    return Targets(*trajectory_advantages(stage.name, trajectories, stage.loop))


def _learn(stage: RLStage, state: TrainState, trajectories: list[Trajectory], iteration: int,
           shuffle_rng: np.random.Generator, key: jax.Array) -> tuple[TrainState, dict]:
    """Advantages, filter and the epochs of minibatch updates of one iteration; returns (state, statistics)."""
    stats = rollout_stats(trajectories)
    trajectories = [through_last_sample(t) for t in trajectories]
    target = targets(stage, state, trajectories, iteration)
    kept = [i for i in range(len(trajectories)) if target.keep[i] > 0]
    stats.update(kept=len(kept), advantage_abs_mean=float(np.mean(np.abs(target.advantages)))
                 if len(target.advantages) else 0.0)
    if not kept:
        return state, stats
    chosen = [trajectories[i] for i in kept]
    current = PolicyParams.from_state(state, stage.frozen)
    old, _ = stage.logprobs(current.params, current.lora_params, None, chosen, stage.loop.minibatch_size)
    mismatch = [np.abs(o - t.sample_logprobs)[t.model_mask.astype(bool)] for o, t in zip(old, chosen)]
    stats["sampler_learner_logprob_mismatch_max"] = float(max((m.max() for m in mismatch if m.size), default=0.0))
    state, step_metrics = _epochs(stage, state, chosen, kept, target, old, shuffle_rng, key)
    for key_name in ("loss", "grad_norm", "ratio_mean", "approx_kl", "trajectory_kl", "clipped_fraction"):
        values_seen = [m[key_name] for m in step_metrics if key_name in m]
        if values_seen:
            stats[key_name] = float(np.mean(values_seen))
    stats["high_kl_stops"] = sum(m["high_kl"] for m in step_metrics)
    stats["updates"] = len(step_metrics) - stats["high_kl_stops"]
    return state, stats


def _epochs(stage: RLStage, state: TrainState, chosen: list[Trajectory], kept: list[int], target: Targets,
            old: list[np.ndarray], shuffle_rng: np.random.Generator, key: jax.Array
            ) -> tuple[TrainState, list[dict]]:
    """The epochs of shuffled minibatch steps over the kept rollouts, ending early when the KL guard fires;
    returns the state and each step's metrics."""
    step_metrics: list = []
    for epoch in range(stage.loop.epochs):
        for part in minibatches(len(chosen), stage.loop.minibatch_size, shuffle_rng):
            batch = stage.place(_minibatch(stage, chosen, [kept[i] for i in part], part, target, old))
            key, step_key = jax.random.split(key)
            state, metrics = stage.update(state, stage.frozen, batch, step_key)
            check_nonfinite(state, metrics, stage.update_config.max_nonfinite_in_row)
            step_metrics.append({k: float(v) for k, v in metrics.items()})
            if metrics["high_kl"]:
                log.warning("%s: KL estimate %.3g to the sampling policy is past loop.kl_stop=%g; this "
                            "iteration's remaining updates are skipped", stage.name,
                            step_metrics[-1]["trajectory_kl"], stage.update_config.kl_stop)
                return state, step_metrics
    return state, step_metrics


def _minibatch(stage: RLStage, chosen: list[Trajectory], rows: list[int], part: np.ndarray, target: Targets,
               old: list[np.ndarray]):
    """The padded batch of kept rollouts `part` (indices into `chosen`; `rows` the same rollouts' indices in the
    iteration, which index the targets)."""
    per_row = lambda values: None if values is None else [values[r] for r in rows]  # noqa: E731
    return sequence_batch([chosen[i] for i in part], advantages=[target.advantages[r] for r in rows],
                          rows=stage.loop.minibatch_size, old_logprobs=[old[i] for i in part],
                          token_advantages=per_row(target.token_advantages), returns=per_row(target.returns),
                          pack=stage.loop.pack, micro_batches=stage.loop.micro_batches)


def _gae_targets(stage: RLStage, state: TrainState, trajectories: list[Trajectory], iteration: int) -> Targets:
    """PPO: per-token GAE advantages (gamma = lambda = 1) and returns from the value head's estimates.

    During the critic warm-up the policy advantages are zero, so only the value head learns.
    """
    current = PolicyParams.from_state(state, stage.frozen)
    _, values = stage.logprobs(current.params, current.lora_params, state.trainable["value_head"], trajectories,
                               stage.loop.minibatch_size)
    padded = pad_trajectories(trajectories)
    count, length = padded["tokens"].shape
    mask = jnp.asarray(padded["model_mask"])
    token_rewards = adv.terminal_rewards(jnp.asarray(padded["reward"]), mask)
    advantages, returns = adv.gae(token_rewards, jnp.clip(jnp.asarray(per_token_rows(values, count, length)), 0.0, 1.0),
                                  mask)
    if iteration <= stage.loop.critic_warmup_iterations:
        advantages = jnp.zeros_like(advantages)
    advantages, returns = np.asarray(advantages), np.asarray(returns)
    return Targets(np.zeros(len(trajectories), np.float32), np.ones(len(trajectories), np.float32),
                   [advantages[i, :len(t.token_ids)] for i, t in enumerate(trajectories)],
                   [returns[i, :len(t.token_ids)] for i, t in enumerate(trajectories)])
