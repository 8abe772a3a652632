"""From trajectory records to the fixed-shape batches the jitted update step takes.

Rows are padded to a multiple of the minibatch (padding rows weigh 0) and tokens to a length bucket, so the update
compiles once per bucket. Old log-probs are recomputed by the learner with the parameters the rollouts were
sampled from (LOOP): the ratio's denominator then matches the numerator's numerics exactly on the first epoch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxagent import packing
from jaxagent.models.config import ModelConfig
from jaxagent.models.lora import LoraConfig
from jaxagent.objectives import sequence_logprobs
from jaxagent.trajectory import SequenceBatch, Trajectory, pad_trajectories


def sequence_batch(trajectories: Sequence[Trajectory], advantages: Sequence[float] | None = None,
                   weights: Sequence[float] | None = None, rows: int | None = None,
                   old_logprobs: Sequence[np.ndarray] | None = None,
                   token_advantages: Sequence[np.ndarray] | None = None,
                   returns: Sequence[np.ndarray] | None = None, pack: bool = False,
                   micro_batches: int = 1) -> SequenceBatch:
    """A SequenceBatch (NumPy leaves) of `trajectories`, padded to `rows` rows and a length bucket.

    Per-trajectory arrays (old log-probs, per-token advantages and returns for PPO) have each trajectory's length.
    Without old log-probs the sampler's are used (SFT ignores them). With `pack` the model runs on the trajectories
    packed into rows of the bucket's length, each micro-batch's on rows of its own (`jaxagent.packing`).
    """
    padded = pad_trajectories(trajectories, rows=rows)
    count, length = padded["tokens"].shape
    n = len(trajectories)
    if token_advantages is not None:
        adv = per_token_rows(token_advantages, count, length)
    else:
        adv = np.zeros(count, np.float32)
        if advantages is not None:
            adv[:n] = np.asarray(advantages, np.float32)
    keep = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    keep = padded["valid"] * np.pad(keep, (0, count - n))
    old = padded["sample_logprobs"] if old_logprobs is None else per_token_rows(old_logprobs, count, length)
    batch = SequenceBatch(padded["tokens"], padded["segment_ids"], padded["model_mask"], padded["turn_index"],
                          padded["sample_logprobs"], old, adv, keep.astype(np.float32),
                          None if returns is None else per_token_rows(returns, count, length))
    if not pack:
        return batch
    packed = packing.pack([t.token_ids for t in trajectories], count, length, micro_batches)
    return batch._replace(packed_tokens_RxL=packed.tokens_RxL, packed_segment_ids_RxL=packed.segment_ids_RxL,
                          pack_index_NxT=packed.index_NxT)


def per_token_rows(arrays: Sequence[np.ndarray], rows: int, length: int) -> np.ndarray:
    """Right-padded [rows, length] from per-trajectory arrays."""
    out = np.zeros((rows, length), np.float32)
    for i, values in enumerate(arrays):
        out[i, :len(values)] = values
    return out


def minibatches(count: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled split of range(count) into chunks of at most `size` indices."""
    order = rng.permutation(count)
    return [order[i:i + size] for i in range(0, count, size)]


class LogprobComputer:
    """Jitted per-token log-probs (and values, with a value head) of padded batches, for old log-probs and GAE."""

    def __init__(self, model: ModelConfig, lora: LoraConfig | None, temperature: float, chunk: int = 512,
                 place: Callable[[Any], Any] = lambda batch: batch, fetch: Callable[[Any], np.ndarray] = np.asarray,
                 pack: bool = False) -> None:
        def run(params, lora_params, value_head, tokens, segments):
            return sequence_logprobs(params, model, tokens, segments, lora_params, lora, temperature, chunk,
                                     value_head)
        self._run = jax.jit(run)
        self._place = place  # host arrays -> where the parameters are (Placement.batch on a mesh)
        self._fetch = fetch  # results -> whole host arrays (Placement.fetch gathers them from every process)
        self._pack = pack  # run on the trajectories packed into rows (jaxagent.packing) instead of one row each

    def __call__(self, params: dict, lora_params: dict | None, value_head: dict | None,
                 trajectories: Sequence[Trajectory], rows_per_call: int
                 ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Per-trajectory log-probs (and values), `rows_per_call` trajectories per padded call."""
        logps, values = [], []
        for start in range(0, len(trajectories), rows_per_call):
            part = trajectories[start:start + rows_per_call]
            lengths = [len(t.token_ids) for t in part]
            padded = pad_trajectories(part, rows=rows_per_call)
            tokens, segments = padded["tokens"], padded["segment_ids"]
            packed = None
            if self._pack:
                packed = packing.pack([t.token_ids for t in part], len(part), tokens.shape[1])
                tokens, segments = packed.tokens_RxL, packed.segment_ids_RxL
            tokens, segments = self._place((tokens, segments))
            logp, value = self._run(params, lora_params, value_head, jnp.asarray(tokens), jnp.asarray(segments))
            logps += self._rows(self._fetch(logp), packed, lengths)
            if value is not None:
                values += self._rows(self._fetch(value), packed, lengths)
        return logps, (values if value_head is not None else None)

    @staticmethod
    def _rows(result: np.ndarray, packed: packing.Packed | None, lengths: list[int]) -> list[np.ndarray]:
        """Each trajectory's values of a per-token result: its own row, or its span of a packed row."""
        if packed is None:
            return [result[i, :n] for i, n in enumerate(lengths)]
        return packing.unpack_rows(result, packed, lengths)
