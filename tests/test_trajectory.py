"""Trajectory records: turn numbering, validation, and padding into fixed-shape arrays."""

from __future__ import annotations

import numpy as np
import pytest

from jaxagent.trajectory import Trajectory, pad_trajectories, through_last_sample, turn_indices


def _trajectory(n: int, mask: list[int], reward: float = 0.5, group: int = 0) -> Trajectory:
    mask_arr = np.asarray(mask, np.int8)
    logprobs = np.where(mask_arr == 1, -1.0, 0.0).astype(np.float32)
    return Trajectory(np.arange(n, dtype=np.int32), mask_arr, logprobs, turn_indices(mask_arr), reward, group, 0,
                      f"t{group}", {"termination": "completed"})


def test_turn_indices_number_each_sampled_run():
    np.testing.assert_array_equal(turn_indices(np.array([0, 1, 1, 0, 0, 1, 0, 1, 1])),
                                  [-1, 0, 0, -1, -1, 1, -1, 2, 2])
    assert _trajectory(5, [0, 1, 0, 1, 1]).num_turns == 2


def test_records_refuse_mismatched_lengths_and_bad_rewards():
    with pytest.raises(ValueError, match="same length"):
        Trajectory(np.zeros(3, np.int32), np.zeros(2, np.int8), np.zeros(3, np.float32), np.zeros(3, np.int32),
                   0.0, 0, 0, "t", {})
    with pytest.raises(ValueError, match="reward 1.5 outside"):
        _trajectory(2, [0, 1], reward=1.5)


def test_padding_rounds_lengths_up_and_marks_padding_rows():
    records = [_trajectory(5, [0, 1, 1, 0, 1], 1.0, 0), _trajectory(300, [0] * 299 + [1], 0.0, 3)]
    arrays = pad_trajectories(records, length_buckets=(256, 512), rows=4)
    assert arrays["tokens"].shape == (4, 512)
    np.testing.assert_array_equal(arrays["segment_ids"].sum(axis=1), [5, 300, 0, 0])
    np.testing.assert_array_equal(arrays["valid"], [1, 1, 0, 0])
    np.testing.assert_array_equal(arrays["group_id"][:2], [0, 3])
    np.testing.assert_array_equal(arrays["turn_index"][0, :6], [-1, 0, 0, -1, 1, -1])
    assert arrays["sample_logprobs"][0, 1] == -1.0 and arrays["sample_logprobs"][0, 5] == 0.0
    with pytest.raises(ValueError, match="rows=1 is fewer than the 2 trajectories"):
        pad_trajectories(records, rows=1)


def test_a_record_cut_after_its_last_sample_keeps_everything_before_it():
    record = _trajectory(7, [0, 1, 1, 0, 1, 0, 0])
    cut = through_last_sample(record)
    assert len(cut.token_ids) == 5 and cut.model_mask.tolist() == [0, 1, 1, 0, 1]
    np.testing.assert_array_equal(cut.sample_logprobs, record.sample_logprobs[:5])
    np.testing.assert_array_equal(cut.turn_index, [-1, 0, 0, -1, 1])
    assert (cut.reward, cut.task_id, cut.info) == (record.reward, record.task_id, record.info)
    ends_sampling = _trajectory(3, [0, 1, 1])
    never_sampled = _trajectory(3, [0, 0, 0])
    assert through_last_sample(ends_sampling) is ends_sampling and through_last_sample(never_sampled) is never_sampled
