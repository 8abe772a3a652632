"""Stage `collect`: the offline data SWEET-RL learns from (arXiv 2503.15478, its first step).

The current policy plays `collect.rollouts_per_task` episodes of each training task (all of them, or the first
`collect.tasks` of a seeded shuffle) at `collect.temperature`, and the stage writes them to
`stages/<name>/trajectories.jsonl`: one JSON object per episode with the task (its id and, where the environment
has one, its training-time information: ColBench's hidden reference), the conversation, the reward, success and
why it ended. The critic and the policy step read that file; so can any other tool.

The policy does not change. The stage's held-out evaluation is the previous stage's (the same policy), or, when
the run starts with `collect`, an evaluation of the starting policy. A run stopped during collection collects
again from the start when resumed (the file is written once, whole).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from jaxagent import distributed
from jaxagent.algorithms.common import (
    IterationLoop,
    PolicyParams,
    Setup,
    collect_groups,
    eval_seed,
    evaluate,
    training_tasks,
)
from jaxagent.atomic import staged_file
from jaxagent.metrics import rollout_stats
from jaxagent.trajectory import Trajectory

FILE = "trajectories.jsonl"


def run(setup: Setup, stage_index: int, name: str, policy: PolicyParams) -> tuple[PolicyParams, dict]:
    """Play and save the episodes; returns the unchanged policy and its held-out evaluation."""
    config = setup.config
    loop = IterationLoop(setup, stage_index, name, 1, checkpoint_every=1)  # for its metrics records
    setup.metrics.truncate_after(stage_index, 0)  # a collection stopped midway starts again
    tasks = training_tasks(setup, config.collect.tasks)  # all, or the first N of a seeded shuffle
    settings = dataclasses.replace(config.rollout, temperature=config.collect.temperature, early_stop_fraction=0.0)
    key = jax.random.fold_in(jax.random.key(config.seed), 7_000_003 + stage_index)
    trajectories = collect_groups(setup, policy, tasks, config.collect.rollouts_per_task, settings, key)
    information = {task: training_info(setup, task) for task in tasks}
    if distributed.is_first():
        with staged_file(setup.run_dir / "stages" / name / FILE) as tmp:
            tmp.write_text("".join(json.dumps(record(t, information[t.task_id])) + "\n" for t in trajectories))
    loop.log(1, "collect", rollout_stats(trajectories))
    return policy, held_out(setup, loop, policy)


def trajectories_file(setup: Setup, data: str) -> Path:
    """The offline trajectories a stage reads: `data`, or (empty) this run's collect stage's file."""
    return Path(data) if data else setup.run_dir / "stages" / "collect" / FILE


def training_info(setup: Setup, task_id: str) -> str | None:
    """What the environment knows about `task_id` that the agent does not (None where it has no such thing)."""
    env = setup.make_env(task_id, 0)
    try:
        return env.training_info() if hasattr(env, "training_info") else None
    finally:
        env.close()


def record(trajectory: Trajectory, information: str | None) -> dict:
    """One episode as a line of trajectories.jsonl."""
    return {"task": {"task_id": trajectory.task_id, "training_info": information},
            "messages": list(trajectory.messages), "reward": trajectory.reward,
            "success": bool(trajectory.info.get("success", trajectory.reward >= 1.0)),
            "termination": trajectory.termination, "rollout_index": trajectory.rollout_index}


def held_out(setup: Setup, loop: IterationLoop, policy: PolicyParams) -> dict:
    """The previous stage's evaluation (the policy is the same), else a new one."""
    if loop.stage_index > 0:
        previous = setup.run_dir / "stages" / setup.config.stages[loop.stage_index - 1] / "result.json"
        if previous.is_file():
            return json.loads(previous.read_text())
    stats, _ = evaluate(setup, policy, eval_seed(setup.config, loop.stage_index, 0))
    loop.log(1, "eval", stats)
    return stats
