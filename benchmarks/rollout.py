"""The overlapped rollout engine against the lock-step one, with the same environment workers, in one run.

    python -m benchmarks.rollout [--latency 0.25] [--tasks 16] [--rollouts 4] [--repeats 5]

The same round (model, prompts, seeds, limits, 16 environment threads, 32 live episodes) runs with the engine's
two schedules: overlapped (rows whose environment is stepping are left out while the others go on decoding) and
lock-step (`rollout.deterministic`: every decode waits for every pending environment step, as a simple batched
engine does). Two workloads: environments that sleep a seeded uniform 0..2×latency seconds per step, and AppTown's
real sandboxed episodes (an interpreter started per episode, the model's cells run in it). Repetitions alternate the
two schedules after an untimed warm-up of each. Prints one JSON line: per workload the wall seconds of each schedule
(min / median / max) and the headline ratio of medians, lock-step over overlapped (above 1: overlap pays).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time

import jax

from benchmarks.machine import machine
from jaxagent.config import RolloutConfig
from jaxagent.envs.apptown.env import SYSTEM_PROMPT
from jaxagent.envs.apptown.tasks import expert_turns, make_task
from jaxagent.envs.base import Outcome, StepResult
from jaxagent.envs.registry import list_tasks, make_env
from jaxagent.local_tokenizer import train_tokenizer
from jaxagent.models import ModelConfig, init_params
from jaxagent.rollout import collect
from jaxagent.sampling import Sampler
from jaxagent.tokens import ChatRenderer

MODEL = ModelConfig(family="qwen2", vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=64, qkv_bias=True)
SCHEDULES = {"overlapped": False, "lock_step": True}  # RolloutConfig.deterministic


class SlowEnv:
    """Answers each turn after a seeded random delay; ends after `turns` turns."""

    def __init__(self, task_id: str, seed: int, latency: float, turns: int) -> None:
        self.task_id, self.rng, self.latency, self.turns, self.taken = task_id, random.Random(seed), latency, turns, 0

    def reset(self):
        return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"Task {self.task_id}"}]

    def parse_action(self, text):
        return text

    def step(self, text):
        time.sleep(self.rng.uniform(0, 2 * self.latency))
        self.taken += 1
        if self.taken >= self.turns:
            return StepResult("done", done=True, reward=1.0)
        return StepResult(f"observation {self.taken}")

    def evaluate(self):
        return Outcome(0.0, {})

    def close(self):
        pass


def apptown_tokenizer(tasks: list[str]):
    """A tokenizer trained on AppTown's own text, so the model's random turns render as AppTown-like text."""
    texts = [SYSTEM_PROMPT]
    for task_id in tasks:
        task = make_task(task_id)
        texts += [task.instruction, *expert_turns(task)]
    return train_tokenizer(texts * 4, vocab_size=MODEL.vocab_size)


def timed_rounds(make, tasks: list[str], rollouts: int, config: RolloutConfig, renderer, params, repeats: int
                 ) -> dict[str, list[float]]:
    """Wall seconds of `repeats` rounds per schedule, the schedules alternating; each warmed up (compiled) first."""
    samplers = {name: Sampler(MODEL, max_len=config.max_context) for name in SCHEDULES}
    configs = {name: dataclasses.replace(config, deterministic=lock) for name, lock in SCHEDULES.items()}
    for name in SCHEDULES:
        collect(samplers[name], params, renderer, make, tasks, rollouts, configs[name], jax.random.key(0))
    walls: dict[str, list[float]] = {name: [] for name in SCHEDULES}
    for repeat in range(repeats):
        for name in SCHEDULES:
            start = time.perf_counter()
            done = collect(samplers[name], params, renderer, make, tasks, rollouts, configs[name],
                           jax.random.key(repeat + 1))
            walls[name].append(time.perf_counter() - start)
            assert len(done) == len(tasks) * rollouts
    return walls


def summary(walls: dict[str, list[float]]) -> dict:
    out = {f"{name}_wall_s": {"min": round(min(w), 2), "median": round(statistics.median(w), 2),
                              "max": round(max(w), 2)} for name, w in walls.items()}
    out["ratio_lock_step_over_overlapped"] = round(statistics.median(walls["lock_step"])
                                                   / statistics.median(walls["overlapped"]), 2)
    return out


def main() -> None:
    """Command-line entry point: prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.25, help="mean seconds per simulated environment step")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens-per-turn", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    params, _ = init_params(MODEL, jax.random.key(0))
    config = RolloutConfig(max_turns=args.turns, max_tokens_per_turn=args.tokens_per_turn, max_context=1024,
                           decode_chunk=16, max_concurrent=32, env_workers=16, env_timeout_s=60)
    names = [f"t{i}" for i in range(args.tasks)]
    simulated_renderer = ChatRenderer(train_tokenizer(["Answer briefly. Task observation done."] * 20,
                                                      vocab_size=MODEL.vocab_size))
    simulated = timed_rounds(lambda task, seed: SlowEnv(task, seed, args.latency, args.turns), names, args.rollouts,
                             config, simulated_renderer, params, args.repeats)
    apptown_tasks = list_tasks("apptown", "train")[:args.tasks]
    apptown = timed_rounds(lambda task, seed: make_env("apptown", task, seed), apptown_tasks, args.rollouts, config,
                           ChatRenderer(apptown_tokenizer(apptown_tasks)), params, args.repeats)
    print(json.dumps({
        "benchmark": "rollout", **machine(with_ceilings=False), "episodes": args.tasks * args.rollouts,
        "turns": args.turns, "tokens_per_turn": args.tokens_per_turn, "max_concurrent": config.max_concurrent,
        "env_workers": config.env_workers, "repeats": args.repeats, "mean_latency_s": args.latency,
        "simulated_latency": summary(simulated), "apptown": summary(apptown),
    }))


if __name__ == "__main__":
    main()
