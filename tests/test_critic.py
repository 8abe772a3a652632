"""Stage `critic` (SWEET-RL): Bradley-Terry on pairs of offline ColBench dialogues, with and without the
training-time information, in both scoring modes; its first loss is log 2, its held-out accuracy is reported, and a
run killed mid-stage resumes after the last finished epoch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from jaxagent.data import play_expert
from jaxagent.envs.colbench import Service
from jaxagent.envs.colbench.tasks import offline_split, offline_task
from jaxagent.envs.registry import make_env
from jaxagent.metrics import TIMING_KEYS

from conftest import micro_train_command


@pytest.fixture(scope="module")
def offline_file(tmp_path_factory):
    """Scripted dialogues with mistakes (so rewards differ within a task), in the collect stage's format."""
    service = Service({})
    lines = []
    for task_id in offline_split("train")[:16]:
        for rollout in range(3):
            messages, reward = play_expert(lambda t, seed: make_env("colbench", t, seed, service), task_id,
                                           1000 * rollout + len(lines), 0.6)
            lines.append({"task": {"task_id": task_id, "training_info": offline_task(task_id).ground_truth},
                          "messages": messages, "reward": reward, "success": reward == 1.0,
                          "rollout_index": rollout})
    path = tmp_path_factory.mktemp("offline") / "trajectories.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


CRITIC_MICRO = ["env.name=colbench", "critic.lr=1e-2", "critic.epochs=2", "critic.batch_size=4", "critic.held_out=0.25",
                "rollout.max_context=1024", "eval.tasks=2"]


@pytest.mark.slow
def test_the_critic_trains_on_offline_pairs_reports_held_out_accuracy_and_resumes_after_sigkill(offline_file,
                                                                                              tmp_path):
    """Without the training-time information, with the public code's score (tests/test_sweet.py trains the critic
    with it and the paper's score, then the sweet stage). A run killed after the critic's first epoch continues
    from its checkpoint and ends with the same critic and metrics as the uninterrupted one."""
    def command(run):
        return micro_train_command(run, *CRITIC_MICRO, "critic.epochs=3", "stages=[critic]",
                                   f"critic.data={offline_file}", "critic.use_info=false",
                                   "critic.score=trajectory_mean", "critic.replay=0")

    run = tmp_path / "run"
    proc = subprocess.run(command(run), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_critic_record(run)
    assert json.loads((run / "stages" / "critic" / "critic.json").read_text())["use_info"] is False

    killed = tmp_path / "killed"
    victim = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "critic" / "1").is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (killed / "stages" / "critic" / "critic").exists()
    restarted = subprocess.run(command(killed), capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resumed from the checkpoint of epoch" in restarted.stdout
    for a, b in zip(_critic_leaves(run), _critic_leaves(killed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _records(run) == _records(killed)


def _critic_leaves(run) -> list:
    from jaxagent.checkpoint import load_policy

    critic = load_policy(run / "stages" / "critic" / "critic")
    return jax.tree.leaves(critic.params) + jax.tree.leaves(critic.lora_params or {})


def _records(run) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_critic_record(run) -> dict:
    """The critic stage's metrics hold, and its critic was saved; returns its record."""
    from jaxagent.checkpoint import load_policy

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = next(r for r in records if r["kind"] == "train" and r["stage"] == "critic")
    assert trained["pairs"] > 0 and trained["held_out_pairs"] > 0, trained
    # The critic starts equal to its reference: every score is 0, so the first loss is log 2 and every pair ties.
    assert abs(trained["bt_loss_first"] - math.log(2)) < 1e-5 and trained["held_out_accuracy_start"] == 0.5
    assert 0.0 <= trained["held_out_accuracy"] <= 1.0 and trained["updates"] >= 2
    # The updates move the critic the right way: it now prefers the chosen side of the pairs it trained on.
    assert trained["bt_loss"] < trained["bt_loss_first"] and trained["train_accuracy"] > 0.5, trained
    assert load_policy(run / "stages" / "critic" / "critic").config.vocab_size > 0
    return trained


def test_a_critic_without_pairs_or_data_stops_with_one_line(tmp_path):
    empty = tmp_path / "none.jsonl"
    empty.write_text(json.dumps({"task": {"task_id": "discount/0/0", "training_info": "x"}, "messages": [],
                                 "reward": 0.0, "success": False}) + "\n")
    for data, message in ((empty, "no pairs to train on"), (tmp_path / "missing.jsonl", "no such file")):
        proc = subprocess.run(micro_train_command(tmp_path / f"run-{data.stem}", "env.name=colbench", "stages=[critic]",
                                                  f"critic.data={data}"), capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


@pytest.mark.slow
def test_multi_turn_dpo_trains_the_policy_on_the_same_pairs_from_the_agents_view(offline_file, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(micro_train_command(
        run, "env.name=colbench", "stages=[dpo]", f"dpo.data={offline_file}", "dpo.lr=1e-2", "dpo.epochs=2",
        "dpo.batch_size=4", "rollout.max_context=1024", "eval.tasks=2"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (trained,) = [r for r in records if r["kind"] == "train"]
    # 11 pairs (the critic's 7 + 4: nothing held out); the first loss is log 2 plus the NLL term (0.01 x chosen NLL).
    assert trained["pairs"] == 11 and math.log(2) < trained["dpo_loss_first"] < math.log(2) + 0.01 * 10, trained
    assert trained["margin_accuracy"] > 0.5, trained  # the chosen sides gained on the rejected ones
    assert [r["kind"] for r in records] == ["train", "eval"]


def _numpy_score(log_ratio: np.ndarray, mask: np.ndarray, turns: np.ndarray, score: str) -> float:
    """The two critic scores from their definitions, one trajectory at a time."""
    agent = mask.astype(bool)
    if score == "trajectory_mean":
        return float(log_ratio[agent].mean())
    return float(sum(log_ratio[agent & (turns == k)].mean() for k in np.unique(turns[agent])))


@pytest.mark.parametrize("score", ["turn_sum", "trajectory_mean"])
def test_held_out_scores_of_sides_of_different_lengths_follow_the_definition_and_decide_the_accuracy(score):
    from jaxagent.algorithms.critic import pair_accuracy, side_scores
    from jaxagent.pairs import Pair
    from jaxagent.trajectory import Trajectory

    rng = np.random.default_rng(0)

    def side(length: int) -> Trajectory:
        mask = (rng.random(length) < 0.6).astype(np.int8)
        turns = np.where(mask == 1, np.arange(length) * 3 // length, -1).astype(np.int32)
        return Trajectory(np.zeros(length, np.int32), mask, np.zeros(length, np.float32), turns, 0.0, 0, 0, "t", {})

    pairs = [Pair(side(int(a)), side(int(b)), False) for a, b in rng.integers(20, 300, (12, 2))]
    sides = [t for p in pairs for t in (p.chosen, p.rejected)]
    critic = [rng.normal(size=len(t.model_mask)).astype(np.float32) for t in sides]
    reference = [rng.normal(size=len(t.model_mask)).astype(np.float32) for t in sides]
    expected = [_numpy_score(c - r, t.model_mask, t.turn_index, score) for c, r, t in zip(critic, reference, sides)]
    np.testing.assert_allclose(side_scores(critic, reference, sides, score), expected, rtol=1e-5, atol=1e-6)
    wins = np.mean([1.0 if a > b else 0.0 for a, b in zip(expected[::2], expected[1::2])])
    assert 0.0 < wins < 1.0  # both outcomes occur: the check can see a swapped side
    assert pair_accuracy(critic, reference, pairs, score) == pytest.approx(wins)
    assert pair_accuracy(reference, reference, pairs, score) == 0.5  # equal scores are ties
