"""Preference pairs for trajectory DPO (ETO): an explored trajectory against the expert's for the same task.

ETO's rule, per explored trajectory with an expert of the same task:

- explored reward < expert reward: chosen = the expert, rejected = the explored one, cut to at most the expert's
  agent turns + `extra_turns` (the paper's ScienceWorld setting: + 5), so a long failure does not dominate the pair;
- explored reward > expert reward: chosen = the explored one, rejected = the expert;
- equal rewards: no pair.

Both sides begin with the same prompt (instruction and first observation); only the agent's tokens are scored (the
records' model masks), so prompts and observations are masked on both sides. DPO compares each side with a
reference policy: `with_reference` stores the reference log-probs in the batch, computed once with the policy at the
start of an iteration, whether that policy is LoRA adapters on a base or full parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxagent.trajectory import PairBatch, Trajectory, pad_trajectories, through_last_sample


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference: `chosen` is preferred to `rejected` (same task, same prompt)."""

    chosen: Trajectory
    rejected: Trajectory
    chosen_is_expert: bool

    @property
    def reward_gap(self) -> float:
        return self.chosen.reward - self.rejected.reward


def truncate_turns(trajectory: Trajectory, turns: int) -> Trajectory:
    """`trajectory` cut after its first `turns` agent turns (their end-of-turn token included); unchanged when it
    has no more. The cut record keeps its reward: it is the rejected side of a pair, not a new episode."""
    if turns < 1:
        raise ValueError(f"turns={turns} must be >= 1")
    if trajectory.num_turns <= turns:
        return trajectory
    end = int(np.nonzero(trajectory.turn_index == turns - 1)[0][-1]) + 1
    info = {**trajectory.info, "turns": turns, "truncated_from_turns": trajectory.num_turns}
    return dataclasses.replace(trajectory, token_ids=trajectory.token_ids[:end],
                               model_mask=trajectory.model_mask[:end], sample_logprobs=trajectory.sample_logprobs[:end],
                               turn_index=trajectory.turn_index[:end], info=info,
                               messages=_messages_through_turn(trajectory.messages, turns))


def _messages_through_turn(messages: tuple[dict, ...], turns: int) -> tuple[dict, ...]:
    """The conversation up to and including the agent's `turns`-th message."""
    seen = 0
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            seen += 1
            if seen == turns:
                return messages[: i + 1]
    return messages


def eto_pairs(explored: Sequence[Trajectory], experts: Mapping[str, Trajectory],
              extra_turns: int | None = 5) -> list[Pair]:
    """ETO's pairs of each explored trajectory against its task's expert (see the module doc); `extra_turns=None`
    keeps failures whole. Explored trajectories of tasks without an expert make no pair."""
    pairs = []
    for trajectory in explored:
        expert = experts.get(trajectory.task_id)
        if expert is None or trajectory.reward == expert.reward:
            continue
        # Tokens after the last sampled one weigh nothing in the DPO loss but could lengthen the padded batch.
        trajectory, expert = through_last_sample(trajectory), through_last_sample(expert)
        if trajectory.reward < expert.reward:
            rejected = trajectory if extra_turns is None else truncate_turns(
                trajectory, max(expert.num_turns, 1) + extra_turns)
            pairs.append(Pair(expert, rejected, chosen_is_expert=True))
        else:
            pairs.append(Pair(trajectory, expert, chosen_is_expert=False))
    return pairs


def pair_stats(pairs: Sequence[Pair], explored: int) -> dict[str, float]:
    """Metrics of one iteration's pairs: how many, of how many explored, the fraction whose chosen side is the
    expert, and the mean reward gap."""
    return {"pairs": float(len(pairs)), "explored": float(explored),
            "chosen_is_expert": float(np.mean([p.chosen_is_expert for p in pairs])) if pairs else 0.0,
            "reward_gap": float(np.mean([p.reward_gap for p in pairs])) if pairs else 0.0}


def pair_batch(pairs: Sequence[Pair], rows: int | None = None,
               ref_logprobs: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> PairBatch:
    """A PairBatch (NumPy leaves) of `pairs`, padded to `rows` pairs (padding pairs are invalid) and one length
    bucket; `ref_logprobs[i]` holds the reference log-probs of pair i's (chosen, rejected) tokens."""
    if not pairs:
        raise ValueError("pair_batch needs at least one pair")
    count = rows or len(pairs)
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    padded = pad_trajectories(sides, rows=None)
    length = padded["tokens"].shape[1]

    def as_pairs(key: str, fill: int | float = 0) -> np.ndarray:
        flat = padded[key]
        out = np.full((count, 2, length), fill, flat.dtype)
        out[: len(pairs), 0], out[: len(pairs), 1] = flat[: len(pairs)], flat[len(pairs):]
        return out

    valid = np.zeros(count, np.float32)
    valid[: len(pairs)] = 1.0
    ref = None
    if ref_logprobs is not None:
        ref = np.zeros((count, 2, length), np.float32)
        for i, (chosen, rejected) in enumerate(ref_logprobs):
            ref[i, 0, :len(chosen)], ref[i, 1, :len(rejected)] = chosen, rejected
    return PairBatch(as_pairs("tokens"), as_pairs("segment_ids"), as_pairs("model_mask"), as_pairs("turn_index", -1),
                     valid, ref)


def with_reference(pairs: Sequence[Pair], logprobs: Callable[[list[Trajectory]], list[np.ndarray]],
                   rows: int | None = None) -> PairBatch:
    """`pair_batch` with the reference log-probs that `logprobs` (the policy at the iteration's start, e.g. a
    `LogprobComputer` bound to its parameters) gives each side: computed once, before any update, so the reference
    stays fixed through the epochs for LoRA and full-parameter policies alike."""
    sides = logprobs([p.chosen for p in pairs] + [p.rejected for p in pairs])
    return pair_batch(pairs, rows, list(zip(sides[: len(pairs)], sides[len(pairs):])))
