"""The records that flow from rollout to update: trajectories, their padding into fixed-shape arrays, and the
batches the update step takes (sequences for policy-gradient and SFT losses, chosen/rejected pairs for DPO).

A trajectory holds the exact ids the model saw and produced (never re-tokenized), a mask that is 1 on the tokens
the policy sampled, their log-probs at sampling time, the agent-turn number of each sampled token, the reward in
[0, 1], which task group and rollout it is, and info (tests passed/total, success, turns, termination reason).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from jaxagent.buckets import LENGTH_BUCKETS, round_up

if TYPE_CHECKING:
    import jax


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One episode, token-in/token-out."""

    token_ids: np.ndarray  # [T] int32
    model_mask: np.ndarray  # [T] int8: 1 on sampled tokens (content and end-of-turn token of agent turns)
    sample_logprobs: np.ndarray  # [T] float32: log π(token) at sampling time; 0 where model_mask is 0
    turn_index: np.ndarray  # [T] int32: agent turn of each sampled token (0, 1, ...); -1 elsewhere
    reward: float
    group_id: int
    rollout_index: int
    task_id: str
    info: dict
    messages: tuple[dict, ...] = ()  # the conversation as text (for logs and behaviour statistics)

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if not (len(self.model_mask) == len(self.sample_logprobs) == len(self.turn_index) == n):
            raise ValueError("token_ids, model_mask, sample_logprobs and turn_index must have the same length")
        if not 0.0 <= self.reward <= 1.0:
            raise ValueError(f"reward {self.reward} outside [0, 1]")

    @property
    def termination(self) -> str:
        """Why the episode ended (see jaxagent.envs.base)."""
        return self.info.get("termination", "")

    @property
    def num_turns(self) -> int:
        """Agent turns taken."""
        return int(self.turn_index.max()) + 1 if (self.turn_index >= 0).any() else 0


def through_last_sample(trajectory: Trajectory) -> Trajectory:
    """The trajectory cut after its last sampled token (unchanged if it has none or ends there).

    What follows the last sampled token -- the end-of-turn token the harness adds when the context fills, template
    text after the final turn -- is scored by no loss and no value target (the model is causal), but it would make
    a record one or two tokens longer than `rollout.max_context`, and so pad a whole batch to the next length bucket.
    """
    sampled = np.flatnonzero(trajectory.model_mask)
    end = int(sampled[-1]) + 1 if sampled.size else len(trajectory.token_ids)
    if end == len(trajectory.token_ids):
        return trajectory
    return dataclasses.replace(trajectory, token_ids=trajectory.token_ids[:end], model_mask=trajectory.model_mask[:end],
                               sample_logprobs=trajectory.sample_logprobs[:end], turn_index=trajectory.turn_index[:end])


def turn_indices(model_mask: np.ndarray) -> np.ndarray:
    """Number each contiguous run of sampled tokens as one agent turn; -1 on other tokens."""
    mask = np.asarray(model_mask).astype(bool)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    return np.where(mask, np.cumsum(starts) - 1, -1).astype(np.int32)


def pad_trajectories(trajectories: Sequence[Trajectory], length_buckets: Sequence[int] = LENGTH_BUCKETS,
                     rows: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded [N, T] arrays (T rounded up to a bucket; N to `rows` if given, padding rows weigh 0)."""
    length = round_up(max(len(t.token_ids) for t in trajectories), length_buckets, "trajectory length")
    count = rows or len(trajectories)
    if count < len(trajectories):
        raise ValueError(f"rows={rows} is fewer than the {len(trajectories)} trajectories")
    out = {
        "tokens": np.zeros((count, length), np.int32),
        "segment_ids": np.zeros((count, length), np.int32),
        "model_mask": np.zeros((count, length), np.int32),
        "sample_logprobs": np.zeros((count, length), np.float32),
        "turn_index": np.full((count, length), -1, np.int32),
        "reward": np.zeros(count, np.float32),
        "group_id": np.zeros(count, np.int32),
        "valid": np.zeros(count, np.float32),
    }
    for i, t in enumerate(trajectories):
        n = len(t.token_ids)
        out["tokens"][i, :n] = t.token_ids
        out["segment_ids"][i, :n] = 1
        out["model_mask"][i, :n] = t.model_mask
        out["sample_logprobs"][i, :n] = t.sample_logprobs
        out["turn_index"][i, :n] = t.turn_index
        out["reward"][i] = t.reward
        out["group_id"][i] = t.group_id
        out["valid"][i] = 1.0
    return out


class SequenceBatch(NamedTuple):
    """Trajectories for policy-gradient and SFT losses; [N, T] per token, [N] per trajectory."""

    tokens_NxT: jax.Array
    segment_ids_NxT: jax.Array  # 1 on real tokens, 0 on padding
    model_mask_NxT: jax.Array
    turn_index_NxT: jax.Array
    sample_logprobs_NxT: jax.Array  # from the sampler
    old_logprobs_NxT: jax.Array  # recomputed by the learner before the update
    advantages: jax.Array  # [N], or [N, T] per token (PPO)
    weights_N: jax.Array  # 1 = trained on (kept by the filters), 0 = ignored
    returns_NxT: jax.Array | None = None  # PPO value targets
    ref_logprobs_NxT: jax.Array | None = None  # reference policy; computed in the step when None and LoRA is on
    # Packed (jaxagent.packing): the model runs on these rows instead of tokens_NxT, and each [N, T] token's result
    # is read back from flat index pack_index_NxT of its micro-batch's rows.
    packed_tokens_RxL: jax.Array | None = None
    packed_segment_ids_RxL: jax.Array | None = None
    pack_index_NxT: jax.Array | None = None


class PairBatch(NamedTuple):
    """Chosen/rejected pairs for DPO and the Bradley-Terry critic: [P, 2, T] with index 0 chosen, 1 rejected."""

    tokens_Px2xT: jax.Array
    segment_ids_Px2xT: jax.Array
    model_mask_Px2xT: jax.Array
    turn_index_Px2xT: jax.Array
    valid_P: jax.Array
    ref_logprobs_Px2xT: jax.Array | None = None
