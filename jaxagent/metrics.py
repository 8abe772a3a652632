"""What a run reports: rollout statistics, behaviour statistics, metrics.jsonl and TensorBoard, the reward plot,
summary.json and the terminal table.

Every record in metrics.jsonl has `stage`, `stage_index`, `iteration` and `kind` ("train" or "eval"); a resumed run
first drops the records past its checkpoint, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from jaxagent.trajectory import Trajectory

# Wall-clock fields of metrics records: they differ between runs that are otherwise identical (a resumed run and
# an uninterrupted one), so comparisons of records leave them out.
TIMING_KEYS = frozenset({"seconds", "rollout_s", "learn_s", "eval_s"})

_PLACEHOLDER = re.compile(r"dummy|placeholder|555-0000|example\.com", re.I)
_ERROR = re.compile(r"Traceback|Error:|Exception")
_ASSUME = re.compile(r"\bassum", re.I)
_API_CALL = re.compile(r"\bapis\.(\w+)\.(\w+)\s*\(")  # apis.APP.API( in the agent's code


def rollout_stats(trajectories: Sequence[Trajectory]) -> dict:
    """Reward, success, turns, length and termination reasons of a set of rollouts."""
    if not trajectories:
        return {"episodes": 0}
    rewards = np.asarray([t.reward for t in trajectories])
    stats = {
        "episodes": len(trajectories),
        "reward": float(rewards.mean()),
        "success": float(np.mean([bool(t.info.get("success")) for t in trajectories])),
        "turns": float(np.mean([t.num_turns for t in trajectories])),
        "tokens": float(np.mean([len(t.token_ids) for t in trajectories])),
        "model_tokens": float(np.mean([int(t.model_mask.sum()) for t in trajectories])),
    }
    reasons: dict[str, int] = {}
    for t in trajectories:
        reasons[t.termination] = reasons.get(t.termination, 0) + 1
    stats.update({f"ended_{reason}": count / len(trajectories) for reason, count in sorted(reasons.items())})
    stats.update(behaviour_stats(trajectories))
    return stats


def best_of_n(trajectories: Sequence[Trajectory]) -> dict:
    """With N rollouts per task: the mean over tasks of the best rollout's reward and success (ETO's Best-of-N
    baseline); {} with one rollout per task."""
    by_task: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        by_task.setdefault(t.task_id, []).append(t)
    n = max((len(group) for group in by_task.values()), default=0)
    if n < 2:
        return {}
    return {"best_of_n": n,
            "best_of_n_reward": float(np.mean([max(t.reward for t in group) for group in by_task.values()])),
            "best_of_n_success": float(np.mean([any(t.info.get("success") for t in group)
                                                for group in by_task.values()]))}


def goal_completion(trajectories: Sequence[Trajectory], scenario_of: Callable[[str], str]) -> dict:
    """AppWorld's TGC and SGC in percent: tasks whose tests all pass, and scenarios whose tasks all pass.

    With several rollouts per task, rollout k of every task of a scenario forms that scenario's k-th attempt.
    """
    if not trajectories:
        return {}
    attempts: dict[tuple[str, int], list[bool]] = {}
    for t in trajectories:
        attempts.setdefault((scenario_of(t.task_id), t.rollout_index), []).append(bool(t.info.get("success")))
    return {"tgc": 100.0 * float(np.mean([bool(t.info.get("success")) for t in trajectories])),
            "sgc": 100.0 * float(np.mean([all(passed) for passed in attempts.values()]))}


def behaviour_stats(trajectories: Sequence[Trajectory]) -> dict:
    """The behaviours the LOOP paper's analysis tracks, from the agent's text. Per rollout: doc look-ups (a count),
    and the fraction of rollouts that say "assume", use placeholder values, give up after an error or write several
    code cells in a turn. Per agent turn (`*_per_turn`): the same look-ups, "assume", placeholders and several
    cells, over all turns. And `api_sequences`: per task with a successful rollout, how many distinct sequences of
    API calls its successful rollouts used (mean over those tasks; 1.0 = every success took the same path)."""
    docs, assume, placeholder, give_up, multi_cell, turns = [], [], [], [], [], []
    for t in trajectories:
        agent = [m["content"] for m in t.messages if m["role"] == "assistant"]
        text = "\n".join(agent)
        docs.append(text.count("api_docs."))
        assume.append(bool(_ASSUME.search(text)))
        placeholder.append(bool(_PLACEHOLDER.search(text)))
        multi_cell.append(any(turn.count("```python") > 1 for turn in agent))
        give_up.append(_gave_up(t))
        turns.extend(agent)
    per_turn = max(len(turns), 1)
    return {"doc_lookups": float(np.mean(docs)), "says_assume": float(np.mean(assume)),
            "placeholder_values": float(np.mean(placeholder)), "gives_up_after_error": float(np.mean(give_up)),
            "multi_cell_turns": float(np.mean(multi_cell)),
            "doc_lookups_per_turn": sum(turn.count("api_docs.") for turn in turns) / per_turn,
            "says_assume_per_turn": sum(bool(_ASSUME.search(turn)) for turn in turns) / per_turn,
            "placeholder_values_per_turn": sum(bool(_PLACEHOLDER.search(turn)) for turn in turns) / per_turn,
            "multi_cell_per_turn": sum(turn.count("```python") > 1 for turn in turns) / per_turn,
            **api_sequences(trajectories), **reward_by_habit(trajectories, placeholder, give_up)}


def reward_by_habit(trajectories: Sequence[Trajectory], placeholder: Sequence[bool], give_up: Sequence[bool]) -> dict:
    """Mean reward of the rollouts that gave up after an error (`reward_gave_up`), of the others that used a
    placeholder value (`reward_placeholder`) and of the rest (`reward_other`), for the groups that occur: with partial
    credit, what a habit earns tells whether RL should remove it."""
    groups: dict[str, list[float]] = {}
    for t, dummy, gave_up in zip(trajectories, placeholder, give_up):
        name = "reward_gave_up" if gave_up else "reward_placeholder" if dummy else "reward_other"
        groups.setdefault(name, []).append(t.reward)
    return {name: float(np.mean(rewards)) for name, rewards in sorted(groups.items())}


def api_calls(t: Trajectory) -> tuple[str, ...]:
    """The APIs a rollout's agent code calls, in order ("app.api"; documentation look-ups left out)."""
    text = "\n".join(m["content"] for m in t.messages if m["role"] == "assistant")
    return tuple(f"{app}.{api}" for app, api in _API_CALL.findall(text) if app != "api_docs")


def api_sequences(trajectories: Sequence[Trajectory]) -> dict:
    """{"api_sequences": mean over tasks with a success of the distinct API-call sequences of their successes}
    ({} when nothing succeeded)."""
    by_task: dict[str, set[tuple[str, ...]]] = {}
    for t in trajectories:
        if t.info.get("success"):
            by_task.setdefault(t.task_id, set()).add(api_calls(t))
    return {"api_sequences": float(np.mean([len(s) for s in by_task.values()]))} if by_task else {}


def _gave_up(t: Trajectory) -> bool:
    """The episode was completed unsolved right after an observation that reported an error."""
    if t.info.get("success") or t.termination != "completed":
        return False
    messages = list(t.messages)
    last_agent = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    before = [m for m in messages[:last_agent] if m["role"] == "user"]
    return bool(before) and len(before) > 1 and bool(_ERROR.search(before[-1]["content"]))


class MetricsLog:
    """Appends records to metrics.jsonl and scalars to TensorBoard event files in the run folder."""

    def __init__(self, run_dir: Path, writes: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard_dir = run_dir / "tensorboard"
        self.writes = writes  # False in every process of a multi-process run but the first
        self._writer = None

    def truncate_after(self, stage_index: int, iteration: int) -> None:
        """Drop records past (stage_index, iteration): a resumed run writes them again."""
        if not self.writes:
            return
        kept = [r for r in self.records() if (r["stage_index"], r["iteration"]) <= (stage_index, iteration)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def write(self, record: dict, global_step: int) -> None:
        if not self.writes:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        prefix = f"{record['stage']}/{record['kind']}"
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("iteration",
                                                                                               "stage_index"):
                writer.add_scalar(f"{prefix}/{key}", value, global_step)
        writer.flush()

    def records(self) -> list[dict]:
        return read_records(self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _tensorboard(self):
        if self._writer is None:
            self._writer = _summary_writer_class()(str(self.tensorboard_dir))
        return self._writer


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch where it is installed (seconds
    per process) only to accept torch tensors, and we log Python floats. Unless torch is already loaded, `import
    torch` fails for the length of this one import (tensorboardX expects that), and works again afterwards."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # an import of a module mapped to None raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_rewards(records: Iterable[dict], path: Path) -> Path:
    """reward.png: train reward and held-out success against iteration; the SFT result as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for stage in dict.fromkeys(r["stage"] for r in records):
        rows = [r for r in records if r["stage"] == stage]
        train = [r for r in rows if r["kind"] == "train" and "reward" in r]
        evals = [r for r in rows if r["kind"] == "eval"]
        if stage == "sft":
            for r in evals[-1:]:
                ax.axhline(r["success"], color="gray", linestyle="--", label=f"after SFT: eval success "
                                                                               f"{r['success']:.2f}")
            continue
        if train:
            ax.plot([offset + r["iteration"] for r in train], [r["reward"] for r in train], alpha=0.7,
                    label=f"{stage}: train reward")
        if evals:
            ax.plot([offset + r["iteration"] for r in evals], [r["success"] for r in evals], marker="o",
                    label=f"{stage}: eval success")
        offset += max([r["iteration"] for r in rows], default=0)
    ax.set_xlabel("iteration")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def final_table(stage_results: dict[str, dict]) -> str:
    """The terminal table of held-out results per stage. Behaviour columns (see `behaviour_stats`): docs = doc
    look-ups per episode; dummy, give-up, assume, multi = fractions of episodes with placeholder values, giving up
    after an error, saying "assume", several code cells in a turn; paths = distinct API-call sequences among a
    task's successful rollouts (- when none succeeded)."""
    goals = all("tgc" in r for r in stage_results.values()) and bool(stage_results)  # AppWorld: TGC and SGC too
    header = f"{'stage':<10} {'episodes':>8} {'success':>8} {'reward':>8} {'turns':>6} {'docs':>5} {'dummy':>6} " \
             f"{'give-up':>7} {'assume':>6} {'multi':>5} {'paths':>5}" + (f" {'TGC':>6} {'SGC':>6}" if goals else "")
    best = all("best_of_n" in r for r in stage_results.values()) and bool(stage_results)
    header += f" {'best-of-N reward':>16}" if best else ""
    lines = [header, "-" * len(header)]
    for stage, r in stage_results.items():
        lines.append(f"{stage:<10} {r['episodes']:>8d} {r['success']:>8.3f} {r['reward']:>8.3f} {r['turns']:>6.2f} "
                     f"{r['doc_lookups']:>5.2f} {r['placeholder_values']:>6.3f} {r['gives_up_after_error']:>7.3f} "
                     f"{r.get('says_assume', 0.0):>6.3f} {r.get('multi_cell_turns', 0.0):>5.2f} "
                     + (f"{r['api_sequences']:>5.2f}" if "api_sequences" in r else f"{'-':>5}")
                     + (f" {r['tgc']:>6.1f} {r['sgc']:>6.1f}" if goals else "")
                     + (f" {r['best_of_n_reward']:>12.3f} (N={r['best_of_n']})" if best else ""))
    return "\n".join(lines)
