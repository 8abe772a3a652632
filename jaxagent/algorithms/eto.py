"""ETO (Trial and Error, arXiv 2403.02502): after behaviour cloning, iterations of

1. explore: the current policy plays each training task once (greedily by default, as the public script does);
2. pairs: each explored trajectory against the environment expert's for the same task (`jaxagent.pairs`: the
   better one is chosen; a failure is cut to the expert's turns + `eto.extra_turns`; ties make no pair);
3. trajectory DPO on the pairs for `eto.epochs` epochs, against the policy at the iteration's start (its log-probs
   are computed once, before the first update), with a fresh AdamW at the iteration's beta and learning rate;
4. held-out evaluation.

The expert's trajectories (the environment's scripted expert or gold path, without mistakes) are played once and
cached in the run folder, like the SFT demonstrations. A checkpoint closes every iteration; a resumed run continues
with the next one.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np

from jaxagent import distributed
from jaxagent.algorithms.batching import LogprobComputer
from jaxagent.algorithms.common import (
    IterationLoop,
    PolicyParams,
    Setup,
    collect_groups,
    eval_seed,
    evaluate,
    training_tasks,
)
from jaxagent.algorithms.pair_training import train_on_pairs
from jaxagent.atomic import staged_file
from jaxagent.config import OptimConfig
from jaxagent.data import play_expert
from jaxagent.metrics import rollout_stats
from jaxagent.pairs import eto_pairs, pair_stats
from jaxagent.trajectory import Trajectory, turn_indices
from jaxagent.update import LossConfig, UpdateConfig, init_train_state


def run(setup: Setup, stage_index: int, name: str, policy: PolicyParams) -> tuple[PolicyParams, dict]:
    """`eto.iterations` ETO iterations from `policy`; returns the policy and its held-out evaluation."""
    config, eto = setup.config, setup.config.eto
    tasks = explored_tasks(setup)
    experts = {t.task_id: t for t in expert_records(setup, tasks)}
    frozen = policy.frozen()
    first = update_config(eto, 1, 1)  # every iteration's train state has this shape (a fresh AdamW each time)
    _, fresh = setup.placement.update_step(first, init_train_state(policy.trainable(), first), frozen)
    loop = IterationLoop(setup, stage_index, name, eto.iterations, checkpoint_every=1)
    state, _, start = loop.resume(fresh)
    # The reference's log-probs at the loss's temperature (1: the model's own distribution), whatever temperature
    # the rollouts were sampled at (greedy exploration would otherwise divide by zero).
    logprobs = LogprobComputer(setup.model, setup.lora, first.loss.temperature, place=setup.placement.batch,
                               fetch=setup.placement.fetch)
    try:
        for iteration in loop.progress(start):
            current = PolicyParams.from_state(state, frozen)
            explored = collect_groups(setup, current, tasks, 1, explore_settings(config),
                                      jax.random.fold_in(jax.random.key(config.seed), 1000 * stage_index + iteration))
            pairs = eto_pairs(explored, experts, None if eto.extra_turns < 0 else eto.extra_turns)
            explore = rollout_stats(explored)
            stats = {**pair_stats(pairs, len(explored)), "explore_reward": explore["reward"],
                     "explore_success": explore["success"]}
            if pairs:
                state, dpo = _dpo(setup, state, frozen, pairs, iteration, logprobs)
                stats.update(dpo)
            loop.show(pairs=stats["pairs"])
            loop.log(iteration, "train", stats)
            eval_stats, _ = evaluate(setup, PolicyParams.from_state(state, frozen),
                                     seed=eval_seed(config, stage_index, iteration))
            loop.log(iteration, "eval", eval_stats)
            loop.maybe_checkpoint(iteration, state, {})
    finally:
        loop.close()
    return PolicyParams.from_state(state, frozen), loop.last_eval()


def _dpo(setup: Setup, state, frozen: dict, pairs, iteration: int, logprobs: LogprobComputer):
    """One iteration's DPO epochs on `pairs`, from a fresh optimizer; returns the state and its statistics."""
    config, eto = setup.config, setup.config.eto
    settings = update_config(eto, iteration, eto.epochs * math.ceil(len(pairs) / eto.batch_size))
    state, trained = train_on_pairs(setup, state, frozen, pairs, settings, eto.epochs, eto.batch_size,
                                    (config.seed, iteration), logprobs)
    return state, {"dpo_loss_first": trained["loss_first"], "dpo_loss": trained["loss"],
                   "updates": trained["updates"], "beta": eto.beta(iteration), "lr": eto.lr(iteration)}


def update_config(eto, iteration: int, steps: int) -> UpdateConfig:
    """Sigmoid DPO at the iteration's beta; AdamW at its learning rate, constant after a linear warm-up."""
    optim = OptimConfig(lr=eto.lr(iteration), weight_decay=eto.weight_decay, max_grad_norm=eto.max_grad_norm,
                        schedule="constant", warmup_steps=int(eto.warmup_fraction * steps))
    return UpdateConfig(LossConfig(kind="dpo", beta=eto.beta(iteration)), optim)


def explore_settings(config):
    """Exploration's sampling: the rollout settings at `eto.explore_temperature`, every episode finished."""
    return dataclasses.replace(config.rollout, temperature=config.eto.explore_temperature, early_stop_fraction=0.0)


def explored_tasks(setup: Setup) -> list[str]:
    """The training tasks each iteration explores: all, or the first `eto.explore_tasks` of a seeded shuffle."""
    return training_tasks(setup, setup.config.eto.explore_tasks)


def expert_records(setup: Setup, tasks: list[str]) -> list[Trajectory]:
    """The expert's trajectory of every task (its scripted expert, no mistakes), played once and cached in the run
    folder (eto_experts.jsonl) so a resumed run pairs against the same ones."""
    cache = setup.run_dir / "eto_experts.jsonl"

    def play_and_save() -> None:
        lines = []
        for i, task in enumerate(tasks):
            messages, reward = play_expert(setup.make_env, task, setup.config.seed * 100_003 + i, 0.0)
            lines.append(json.dumps({"task_id": task, "messages": messages, "reward": reward}) + "\n")
        with staged_file(cache) as tmp:
            tmp.write_text("".join(lines))

    distributed.written_by_first(cache, play_and_save)
    records = []
    for i, line in enumerate(cache.read_text().splitlines()):
        demo = json.loads(line)
        conversation = setup.renderer.start(demo["messages"])
        ids = np.asarray(conversation.token_ids, np.int32)
        if len(ids) > setup.config.rollout.max_context:
            continue  # an expert longer than the context cannot be a pair's side
        mask = np.asarray(conversation.model_mask, np.int8)
        records.append(Trajectory(ids, mask, np.zeros(len(ids), np.float32), turn_indices(mask),
                                  float(np.clip(demo["reward"], 0.0, 1.0)), i, 0, demo["task_id"],
                                  {"success": demo["reward"] >= 1.0, "expert": True}, tuple(demo["messages"])))
    return records
