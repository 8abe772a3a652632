"""What every stage shares: the run's setup (model, tokenizer, environment, sampler), the policy being trained,
held-out evaluation, and the resumable iteration loop (metrics, checkpoints, progress bar).

A stage is a function `run(setup, stage_index, name, policy) -> (policy, eval_stats)`. It starts from the previous
stage's policy, resumes from its own last checkpoint if there is one, and ends with a held-out evaluation.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxagent import distributed
from jaxagent.checkpoint import StageCheckpoints
from jaxagent.config import RolloutConfig, TrainConfig
from jaxagent.envs.base import Environment
from jaxagent.envs.registry import get_spec, list_tasks
from jaxagent.metrics import TIMING_KEYS, MetricsLog, best_of_n, goal_completion, rollout_stats
from jaxagent.models.config import ModelConfig
from jaxagent.models.lora import LoraConfig
from jaxagent.placement import Placement
from jaxagent.rollout import collect
from jaxagent.sampling import Sampler
from jaxagent.tokens import ChatRenderer
from jaxagent.trajectory import Trajectory
from jaxagent.update import TrainState


@dataclasses.dataclass
class Setup:
    """The fixed parts of a run."""

    config: TrainConfig
    model: ModelConfig
    lora: LoraConfig | None
    tokenizer_dir: Path
    renderer: ChatRenderer
    make_env: Callable[[str, int], Environment]
    sampler: Sampler
    run_dir: Path
    metrics: MetricsLog
    placement: Placement
    service: Any = None  # the environment's shared processes (AppWorld's server pool), closed with the run
    started: float = dataclasses.field(default_factory=time.time)

    def close(self) -> None:
        """Flush the metrics and stop the environment's processes."""
        self.metrics.close()
        if self.service is not None:
            self.service.close()


@dataclasses.dataclass
class PolicyParams:
    """The policy between stages: base parameters and (with LoRA) adapters."""

    params: dict
    lora_params: dict | None = None

    def trainable(self) -> dict:
        return {"lora": self.lora_params} if self.lora_params is not None else {"params": self.params}

    def frozen(self) -> dict:
        return {"params": self.params} if self.lora_params is not None else {}

    @staticmethod
    def from_state(state: TrainState, frozen: dict) -> "PolicyParams":
        if "lora" in state.trainable:
            return PolicyParams(frozen["params"], state.trainable["lora"])
        return PolicyParams(state.trainable["params"])


def eval_tasks(setup: Setup, split: str | None = None) -> list[str]:
    """The held-out tasks (the first `eval.tasks` of the split, or all)."""
    config = setup.config
    tasks = list_tasks(config.env.name, split or config.eval.split or config.env.eval_split, config.env.options)
    return tasks[:config.eval.tasks] if config.eval.tasks else tasks


def training_tasks(setup: Setup, count: int) -> list[str]:
    """The training split's tasks: all of them (count 0), or the first `count` of a shuffle seeded by the run."""
    config = setup.config
    tasks = list_tasks(config.env.name, config.env.train_split, config.env.options)
    return random.Random(config.seed).sample(tasks, min(count, len(tasks))) if count else tasks


def eval_seed(config: TrainConfig, stage_index: int, iteration: int) -> int:
    """The seed of the evaluation after `iteration` of a stage (recorded, so `jaxagent.evaluate` can repeat it)."""
    return config.seed * 7919 + stage_index * 1_000_003 + iteration


def collect_groups(setup: Setup, policy: PolicyParams, tasks: Sequence[str], rollouts_per_task: int,
                   rollout: RolloutConfig, key: jax.Array) -> list[Trajectory]:
    """`rollouts_per_task` episodes of every task, as `jaxagent.rollout.collect` plays them.

    In a multi-process run each process plays every P-th task (whole groups: leave-one-out compares the rollouts
    of one task) on its own devices, and every process returns all of them, ordered by (task, rollout).
    """
    if jax.process_count() == 1:
        return collect(setup.sampler, policy.params, setup.renderer, setup.make_env, tasks, rollouts_per_task,
                       rollout, key, policy.lora_params)
    # Every process joins the re-placement of the parameters (a collective), even one without tasks this round.
    params, lora_params = setup.sampler.place_params(policy.params, policy.lora_params)
    mine = distributed.share_of(len(tasks))
    local = collect(setup.sampler, params, setup.renderer, setup.make_env, [tasks[i] for i in mine],
                    rollouts_per_task, rollout, jax.random.fold_in(key, jax.process_index()),
                    lora_params) if mine else []
    local = [dataclasses.replace(t, group_id=mine[t.group_id]) for t in local]
    everything = [t for part in distributed.gather_objects(local) for t in part]
    return sorted(everything, key=lambda t: (t.group_id, t.rollout_index))


def evaluate(setup: Setup, policy: PolicyParams, seed: int, split: str | None = None
             ) -> tuple[dict, list[Trajectory]]:
    """Roll out on held-out tasks with the evaluation sampling settings; returns (statistics, trajectories).

    Evaluation never touches the training RNG stream: its key depends only on `seed`.
    """
    config = setup.config
    rollout = dataclasses.replace(config.rollout, temperature=config.eval.temperature, top_p=config.eval.top_p,
                                  early_stop_fraction=0.0)
    trajectories = collect_groups(setup, policy, eval_tasks(setup, split), config.eval.rollouts_per_task, rollout,
                                  jax.random.key(seed))
    stats = {**rollout_stats(trajectories), **best_of_n(trajectories)}  # the mean, and the best of N per task
    scenario = get_spec(config.env.name).scenario
    if scenario is not None:  # AppWorld reports TGC and SGC
        stats.update(goal_completion(trajectories, scenario))
    return {**stats, "eval_seed": seed}, trajectories


class IterationLoop:
    """Iterations 1..total of one stage with resume, metrics, evaluation, checkpoints and a progress bar."""

    def __init__(self, setup: Setup, stage_index: int, name: str, total: int, checkpoint_every: int) -> None:
        self.setup, self.stage_index, self.name, self.total = setup, stage_index, name, total
        self.checkpoint_every = checkpoint_every
        self.checkpoints = StageCheckpoints(setup.run_dir / "checkpoints" / name, setup.config.checkpoint.keep)
        self._bar = None

    def resume(self, fresh: TrainState) -> tuple[TrainState, dict, int]:
        """(state, meta, first iteration to run): from the last checkpoint, or the fresh state at iteration 1."""
        latest = self.checkpoints.latest()
        if latest is None:
            self.setup.metrics.truncate_after(self.stage_index, 0)
            return fresh, {}, 1
        state, meta = self.checkpoints.restore(latest, fresh)
        self.setup.metrics.truncate_after(self.stage_index, latest)
        print(f"{self.name}: resumed from the checkpoint of iteration {latest} in {self.checkpoints.folder}",
              flush=True)
        return state, meta, latest + 1

    def log(self, iteration: int, kind: str, stats: dict) -> None:
        record = {"stage": self.name, "stage_index": self.stage_index, "iteration": iteration, "kind": kind,
                  "seconds": round(time.time() - self.setup.started, 2), **_plain(stats)}
        self.setup.metrics.write(record, iteration)

    def maybe_checkpoint(self, iteration: int, state: TrainState, meta: dict, last: bool = False) -> None:
        """Save every `checkpoint_every` iterations and at the last one (`total`, or `last` for a stage that ends
        early)."""
        if iteration % self.checkpoint_every == 0 or iteration == self.total or last:
            self.checkpoints.save(iteration, state, {"iteration": iteration, **meta})

    def progress(self, start: int):
        """A progress bar over the remaining iterations (a plain range when progress bars are off)."""
        iterations = range(start, self.total + 1)
        if not self.setup.config.progress:
            return iterations
        from tqdm import tqdm

        self._bar = tqdm(iterations, desc=self.name, initial=start - 1, total=self.total, dynamic_ncols=True)
        return self._bar

    def show(self, **values: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)

    def last_eval(self) -> dict:
        """The stage's last held-out evaluation, as logged."""
        distributed.barrier(f"last eval of {self.name}")  # process 0 has written it
        evals = [r for r in self.setup.metrics.records() if r["stage_index"] == self.stage_index
                 and r["kind"] == "eval"]
        if not evals:
            raise RuntimeError(f"stage {self.name} has no evaluation record in {self.setup.metrics.path}")
        dropped = {"stage", "stage_index", "kind", *TIMING_KEYS}
        return {k: v for k, v in evals[-1].items() if k not in dropped}

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.checkpoints.close()


def key_to_json(key: jax.Array) -> list[int]:
    return [int(x) for x in np.asarray(jax.random.key_data(key)).ravel()]


def key_from_json(data: list[int]) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32))


def _plain(stats: dict) -> dict:
    return {k: (float(v) if isinstance(v, (np.floating, np.integer)) or hasattr(v, "dtype") else v)
            for k, v in stats.items()}
