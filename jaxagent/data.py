"""Where training data comes from: task batches (grain, resumable) and demonstrations for behaviour cloning.

Task batches: the training split is shuffled with the run's seed, repeated, and cut into batches of tasks per
iteration by a grain dataset; the iterator's state goes into every checkpoint, so a resumed run sees the batches an
uninterrupted run would have seen.

Demonstrations: either the environment's expert played through the real environment (observations are the
environment's own), or a JSONL file with one `{"messages": [...]}` conversation per line.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import grain

from jaxagent.envs.base import Environment, Message
from jaxagent.errors import UserError


class DataError(UserError):
    """Bad training data (a malformed JSONL line, an empty split); the message says where and what is expected."""


class TaskBatches:
    """An endless, shuffled, resumable stream of task batches."""

    def __init__(self, tasks: Sequence[str], batch_size: int, seed: int) -> None:
        if not tasks:
            raise DataError("the training split has no tasks")
        dataset = grain.MapDataset.source(list(tasks)).shuffle(seed=seed).repeat().batch(batch_size,
                                                                                           batch_fn=list)
        # Read in the caller's thread: a batch is a few task names, and grain's default (16 threads prefetching
        # 500 batches of an endless dataset) keeps CPU cores busy that rollouts and updates need.
        synchronous = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._iterator = iter(dataset.to_iter_dataset(synchronous))

    def __next__(self) -> list[str]:
        return [str(task) for task in next(self._iterator)]

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)


def play_expert(make_env: Callable[[str, int], Environment], task_id: str, seed: int, mistake_rate: float
                ) -> tuple[list[Message], float]:
    """One expert episode through the real environment: (conversation, reward)."""
    env = make_env(task_id, seed)
    try:
        messages = list(env.reset())
        turns = env.expert_turns(mistake_rate, random.Random(seed))
        reward = None
        for turn in turns:
            messages.append({"role": "assistant", "content": turn})
            result = env.step(turn)
            if result.done:
                reward = result.reward
                break
            messages.append({"role": "user", "content": result.observation})
        if reward is None:
            reward = env.evaluate().reward
            if messages[-1]["role"] == "user":
                messages.pop()  # the expert stopped; the last observation was never answered
        return messages, float(reward)
    finally:
        env.close()


def expert_demonstrations(make_env: Callable[[str, int], Environment], tasks: Sequence[str], count: int,
                          mistake_rate: float, seed: int, workers: int = 8) -> list[tuple[list[Message], float]]:
    """`count` expert episodes over `tasks` (cycling), each with its own seeded mistakes."""
    if not tasks:
        raise DataError("the training split has no tasks to demonstrate")
    jobs = [(tasks[i % len(tasks)], seed * 100_003 + i) for i in range(count)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: play_expert(make_env, job[0], job[1], mistake_rate), jobs))


def read_conversations(path: str | Path) -> list[list[Message]]:
    """Conversations from a JSONL file: one {"messages": [{"role", "content"}, ...]} object per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sft.data={str(path)!r}: no such file; give 'expert' or a JSONL file of conversations")
    conversations = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = record["messages"]
            if not messages or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}:{number}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}"
                            ) from None
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{number}: the conversation has no assistant turn to learn from")
        conversations.append(messages)
    if not conversations:
        raise DataError(f"{path}: no conversations")
    return conversations
