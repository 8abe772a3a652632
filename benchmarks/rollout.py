"""How much environment time the rollout engine hides behind decoding.

    python -m benchmarks.rollout [--latency 0.25] [--tasks 16] [--rollouts 4]

The same rollout (same model, prompts, seeds, limits) runs twice: with environments that answer at once, and with
environments that take a random 0..2×latency seconds per step (as code execution or a web call would). Prints one
JSON line: both wall times, the environment seconds spent in total, and the hidden fraction
1 - (extra wall time) / (total environment seconds). A serial engine that waits for every environment step would
show a hidden fraction of 0; the extra wall time of a perfectly overlapped one is close to 0.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time

import jax

from jaxagent.envs.base import Outcome, StepResult
from jaxagent.local_tokenizer import train_tokenizer
from jaxagent.models import ModelConfig, init_params
from jaxagent.rollout import RolloutConfig, collect
from jaxagent.sampling import Sampler
from jaxagent.tokens import ChatRenderer

MODEL = ModelConfig(family="qwen2", vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=64, qkv_bias=True)


class SlowEnv:
    """Answers each turn after a seeded random delay; ends after `turns` turns."""

    def __init__(self, task_id: str, seed: int, latency: float, turns: int, clock: list, lock) -> None:
        self.task_id, self.rng, self.latency, self.turns = task_id, random.Random(seed), latency, turns
        self.clock, self.lock, self.taken = clock, lock, 0

    def reset(self):
        return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"Task {self.task_id}"}]

    def parse_action(self, text):
        return text

    def step(self, text):
        delay = self.rng.uniform(0, 2 * self.latency) if self.latency else 0.0
        time.sleep(delay)
        with self.lock:
            self.clock[0] += delay
        self.taken += 1
        if self.taken >= self.turns:
            return StepResult("done", done=True, reward=1.0)
        return StepResult(f"observation {self.taken}")

    def evaluate(self):
        return Outcome(0.0, {})

    def close(self):
        pass


def run(latency: float, tasks: int, rollouts: int, turns: int, renderer, params, config) -> tuple[float, float]:
    """Wall seconds of one rollout round and the environment seconds spent in it."""
    clock, lock = [0.0], threading.Lock()
    sampler = Sampler(MODEL, max_len=config.max_context)
    make = lambda task, seed: SlowEnv(task, seed, latency, turns, clock, lock)  # noqa: E731
    names = [f"t{i}" for i in range(tasks)]
    warm = lambda task, seed: SlowEnv(task, seed, 0.0, turns, [0.0], lock)  # noqa: E731
    collect(sampler, params, renderer, warm, names, rollouts, config, jax.random.key(0))  # compiles, untimed
    start = time.perf_counter()
    trajectories = collect(sampler, params, renderer, make, names, rollouts, config, jax.random.key(1))
    wall = time.perf_counter() - start
    assert len(trajectories) == tasks * rollouts
    return wall, clock[0]


def main() -> None:
    """Command-line entry point: prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.25, help="mean seconds per environment step")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens-per-turn", type=int, default=48)
    args = parser.parse_args()
    renderer = ChatRenderer(train_tokenizer(["Answer briefly. Task observation done."] * 20, vocab_size=512))
    params, _ = init_params(MODEL, jax.random.key(0))
    config = RolloutConfig(max_turns=args.turns, max_tokens_per_turn=args.tokens_per_turn, max_context=1024,
                           decode_chunk=16, max_concurrent=32, env_workers=16)
    zero_wall, _ = run(0.0, args.tasks, args.rollouts, args.turns, renderer, params, config)
    slow_wall, env_seconds = run(args.latency, args.tasks, args.rollouts, args.turns, renderer, params, config)
    print(json.dumps({
        "benchmark": "rollout", "episodes": args.tasks * args.rollouts, "turns": args.turns,
        "tokens_per_turn": args.tokens_per_turn, "mean_latency_s": args.latency, "max_concurrent": 32,
        "env_workers": 16, "wall_s_zero_latency": round(zero_wall, 2), "wall_s_with_latency": round(slow_wall, 2),
        "env_seconds_total": round(env_seconds, 2),
        "hidden_fraction": round(1 - (slow_wall - zero_wall) / env_seconds, 3) if env_seconds else None,
    }))


if __name__ == "__main__":
    main()
