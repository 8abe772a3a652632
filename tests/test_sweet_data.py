"""SWEET-RL's critic data: pairs as the public code builds them, the critic's view with and without the
training-time information, whole tasks held out, and a bad trajectories file refused."""

from __future__ import annotations

import json

import pytest

from jaxagent.sweet_data import (
    INFO_HEADER,
    TrajectoryFileError,
    critic_messages,
    critic_pairs,
    read_trajectories,
    split_by_task,
)


def _record(task: str, reward: float, index: int, info: str = "def f(x):\n    return x\n") -> dict:
    return {"task": {"task_id": task, "training_info": info}, "reward": reward, "success": reward == 1.0,
            "rollout_index": index,
            "messages": [{"role": "system", "content": "Ask, then answer."}, {"role": "user", "content": task},
                         {"role": "assistant", "content": f"rollout {index}"}]}


def test_a_task_pairs_its_successful_best_against_each_strictly_worse_rollout():
    records = [_record("a", 0.5, 0), _record("a", 1.0, 1), _record("a", 0.0, 2), _record("a", 1.0, 3),  # tie kept out
               _record("b", 0.75, 0), _record("b", 0.25, 1),  # best did not succeed: no pairs
               _record("c", 1.0, 0), _record("c", 1.0, 1)]  # all equal: no pairs
    pairs = critic_pairs(records)
    assert [(c["task"]["task_id"], c["rollout_index"], r["rollout_index"]) for c, r in pairs] == [
        ("a", 1, 0), ("a", 1, 2)]


def test_the_critic_reads_the_reference_first_and_the_no_info_ablation_does_not():
    record = _record("a", 1.0, 0, info="def add(a, b):\n    return a + b")
    with_info = critic_messages(record)
    assert with_info[0]["content"].startswith(INFO_HEADER + "def add(a, b):") and len(with_info) == 3
    assert with_info[0]["content"].endswith("Ask, then answer.") and with_info[1:] == record["messages"][1:]
    assert critic_messages(record, with_info=False) == record["messages"]
    assert record["messages"][0]["content"] == "Ask, then answer."  # the record itself is untouched
    no_system = {**record, "messages": record["messages"][1:]}
    assert critic_messages(no_system)[0]["role"] == "system" and len(critic_messages(no_system)) == 3


def test_held_out_pairs_come_from_tasks_never_trained_on():
    records = [_record(f"t{i}", r, k) for i in range(20) for k, r in enumerate((1.0, 0.0, 0.5))]
    train, held_out = split_by_task(critic_pairs(records), 0.25, seed=0)
    assert len(held_out) == 5 * 2 and len(train) == 15 * 2
    assert not {c["task"]["task_id"] for c, _ in train} & {c["task"]["task_id"] for c, _ in held_out}
    assert split_by_task(critic_pairs(records), 0.25, seed=0) == (train, held_out)


def test_a_bad_trajectories_file_is_refused_with_the_line(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    path.write_text(json.dumps(_record("a", 1.0, 0)) + "\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(TrajectoryFileError, match=r"trajectories.jsonl:2: expected"):
        read_trajectories(path)
    with pytest.raises(TrajectoryFileError, match="no such file"):
        read_trajectories(tmp_path / "missing.jsonl")
    path.write_text(json.dumps(_record("a", 1.0, 0)) + "\n\n")
    assert read_trajectories(path)[0]["task"]["task_id"] == "a"
