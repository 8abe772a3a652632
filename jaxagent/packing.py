"""Packing: several trajectories share one row of the model's input, each as its own segment.

A minibatch padded to its longest trajectory computes mostly padding when lengths vary (AppTown: rollouts of ~300
tokens padded to 768). Packed, the model runs on a few full rows instead, and the log-probs are read back into each
trajectory's own row of the [N, T] batch (`index_NxT`), so every loss, mask and statistic downstream is unchanged.

The model sees each trajectory exactly as it would alone: attention never crosses segments (segment ids 1, 2, ...
within a row), positions restart at each segment's start, and a segment's first token gets log-prob 0 as position 0
of an unpacked row does.

Rows are packed first-fit decreasing (longest trajectory first, into the first row with room), each group of
trajectories (one per micro-batch) on its own rows, so a micro-batch's index never leaves its rows. The row count is
rounded up to a bucket, so the jitted step compiles once per (rows, length) bucket.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from jaxagent.buckets import round_up

# Packed rows per group: steps of about 1.5x, so a bucket wastes at most a third of its rows.
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)


class Packed(NamedTuple):
    """Trajectories packed into rows: [R, L] tokens and segment ids, and where each trajectory's tokens went."""

    tokens_RxL: np.ndarray  # int32
    segment_ids_RxL: np.ndarray  # int32: 1, 2, ... per trajectory within a row; 0 on padding
    index_NxT: np.ndarray  # int32: flat index into its group's rows of trajectory n's token t (0 past its end)
    rows: np.ndarray  # [N] int32: the row (within its group) each trajectory went to; -1 for padding rows
    offsets: np.ndarray  # [N] int32: where in that row it starts


def first_fit(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Rows of indices into `lengths`: longest first, each into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > row_length:
            raise ValueError(f"a trajectory of {lengths[i]} tokens does not fit rows of {row_length}")
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(row_length)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return rows


def pack(token_ids: Sequence[np.ndarray], count: int, length: int, groups: int = 1) -> Packed:
    """Pack `token_ids` (the first of `count` batch rows; the rest are padding rows) into rows of `length` tokens.

    The `count` rows split into `groups` equal consecutive groups (micro-batches); each packs onto its own
    `R / groups` rows, and a trajectory's index counts within its group's rows.
    """
    if count % groups:
        raise ValueError(f"{count} rows do not split into {groups} groups")
    per_group = count // groups
    layouts = [first_fit([len(t) for t in token_ids[g * per_group:(g + 1) * per_group]], length)
               for g in range(groups)]
    rows_per_group = round_up(max(len(layout) for layout in layouts), ROW_BUCKETS, "packed rows")
    tokens = np.zeros((groups * rows_per_group, length), np.int32)
    segments = np.zeros_like(tokens)
    index = np.zeros((count, length), np.int32)
    row_of, offset_of = np.full(count, -1, np.int32), np.zeros(count, np.int32)
    for g, layout in enumerate(layouts):
        for r, members in enumerate(layout):
            start = 0
            for segment, member in enumerate(members, 1):
                n = g * per_group + member
                ids = np.asarray(token_ids[n])
                tokens[g * rows_per_group + r, start:start + len(ids)] = ids
                segments[g * rows_per_group + r, start:start + len(ids)] = segment
                index[n, :len(ids)] = r * length + start + np.arange(len(ids))
                row_of[n], offset_of[n] = r, start
                start += len(ids)
    return Packed(tokens, segments, index, row_of, offset_of)


def unpack_rows(packed_RxL: np.ndarray, packed: Packed, lengths: Sequence[int], groups: int = 1) -> list[np.ndarray]:
    """Per trajectory, its values of a [R, L] result computed on the packed rows (host side)."""
    count = len(packed.rows)
    rows_per_group = packed_RxL.shape[0] // groups
    out = []
    for n, size in enumerate(lengths):
        row = (n // (count // groups)) * rows_per_group + packed.rows[n]
        out.append(packed_RxL[row, packed.offsets[n]:packed.offsets[n] + size])
    return out
