"""SWEET-RL's critic data: pairs of offline trajectories of the same task and the critic's view of each.

The offline trajectories are the `collect` stage's `trajectories.jsonl` (one episode per line: the task with its
training-time information, the conversation, the reward, success). Pairs follow the public code: a task contributes
only when its best rollout succeeds; that rollout is chosen, and every rollout of the task with a strictly lower
reward is rejected against it. The critic reads the training-time information (ColBench: the hidden reference
solution) before the dialogue, added to the conversation's system message; the `no_info` ablation reads the
dialogue alone, as the agent did.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from jaxagent.envs.base import Message
from jaxagent.errors import UserError

INFO_HEADER = "Training-time information (the agent never saw it): the reference solution is\n"


class TrajectoryFileError(UserError):
    """A trajectories file that is missing or not in the collect stage's format."""


def read_trajectories(path: str | Path) -> list[dict]:
    """The episodes of a trajectories.jsonl file, each checked for the fields the critic needs."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryFileError(f"{str(path)!r}: no such file; give a trajectories.jsonl written by the collect "
                                  "stage (stages/collect/trajectories.jsonl in its run folder)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record["task"]["task_id"], str) or not isinstance(record["messages"], list):
                raise TypeError
            float(record["reward"])
        except (ValueError, KeyError, TypeError):
            raise TrajectoryFileError(f"{path}:{number}: expected {{\"task\": {{\"task_id\", \"training_info\"}}, "
                                      "\"messages\": [...], \"reward\": ..., \"success\": ...}") from None
        records.append(record)
    return records


def critic_pairs(records: Sequence[dict]) -> list[tuple[dict, dict]]:
    """(chosen, rejected) pairs: per task whose best rollout succeeded, the best against each strictly worse one."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_task[record["task"]["task_id"]].append(record)
    pairs = []
    for rollouts in by_task.values():
        best = max(rollouts, key=lambda r: float(r["reward"]))  # the first of equals, as the public code's argmax
        if not best.get("success"):
            continue
        pairs += [(best, other) for other in rollouts if float(other["reward"]) < float(best["reward"])]
    return pairs


def critic_messages(record: dict, with_info: bool = True) -> list[Message]:
    """The conversation as the critic reads it: the training-time information first (unless `with_info` is off)."""
    messages = [dict(m) for m in record["messages"]]
    info = record["task"].get("training_info")
    if not with_info or not info:
        return messages
    header = f"{INFO_HEADER}{info.strip()}\n\n"
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = header + messages[0]["content"]
        return messages
    return [{"role": "system", "content": header.rstrip("\n")}] + messages


def split_by_task(pairs: Sequence[tuple[dict, dict]], held_out: float, seed: int
                  ) -> tuple[list[tuple[dict, dict]], list[tuple[dict, dict]]]:
    """(training pairs, held-out pairs): whole tasks held out (a fraction of them, seeded), so held-out accuracy
    measures tasks the critic never trained on."""
    tasks = sorted({chosen["task"]["task_id"] for chosen, _ in pairs})
    kept_out = set(random.Random(seed).sample(tasks, round(held_out * len(tasks))))
    train = [p for p in pairs if p[0]["task"]["task_id"] not in kept_out]
    return train, [p for p in pairs if p[0]["task"]["task_id"] in kept_out]
