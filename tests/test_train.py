"""The training driver end to end with minimal sizes: every stage and ablation config, what a run leaves behind,
resuming after SIGKILL (bitwise equal to an uninterrupted run), and `jaxagent.evaluate` repeating the final table."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxagent.algorithms import loop as loop_algorithms
from jaxagent.algorithms.batching import LogprobComputer
from jaxagent.algorithms.common import evaluate
from jaxagent.algorithms.sft import ends_on_loss
from jaxagent.checkpoint import load_policy
from jaxagent.config import ConfigError, SftSection, load_config
from jaxagent.evaluate import evaluate_run
from jaxagent.metrics import TIMING_KEYS
from jaxagent.train import train
from jaxagent.update import UpdateConfig, init_train_state, make_update_step

from conftest import MICRO, micro_train_command, tiny_pretrained


def leaves(folder):
    policy = load_policy(folder)
    return jax.tree.leaves(policy.params) + jax.tree.leaves(policy.lora_params or {})


@pytest.mark.slow
def test_every_stage_runs_end_to_end_and_leaves_its_reports(tmp_path):
    stages = "stages=[sft, loop, grpo, rloo, ppo, reinforce, ei]"
    # eval.every=2: one evaluation per stage, at its end (each stage runs two iterations)
    summary = train(load_config("tiny", MICRO + [stages, "eval.every=2", f"run_dir={tmp_path}"]))
    assert list(summary["stages"]) == ["sft", "loop", "grpo", "rloo", "ppo", "reinforce", "ei"]
    for result in summary["stages"].values():
        assert 0.0 <= result["eval_success"] <= result["eval_reward"] + 1e-9 or result["eval_success"] == 0.0
        assert result["eval_episodes"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["stages"].keys() == summary["stages"].keys()
    assert (tmp_path / "reward.png").stat().st_size > 1000
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records if r["kind"] == "eval"} == set(summary["stages"])
    assert load_config(str(tmp_path / "config.yaml"), [f"run_dir={tmp_path}"]).stages[-1] == "ei"
    for name in summary["stages"]:
        assert (tmp_path / "stages" / name / "policy" / "jaxagent.json").is_file()
        assert len(list((tmp_path / "checkpoints" / name).iterdir())) <= 2  # checkpoint.keep


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_grpo", "tiny_rloo", "tiny_ppo", "tiny_bandit", "tiny_turn"])
def test_ablation_configs_run_end_to_end(name, tmp_path):
    summary = train(load_config(name, MICRO + ["sft.epochs=1", f"run_dir={tmp_path}"]))
    assert list(summary["stages"]) == list(load_config(name).stages)


ETO_MICRO = ["eto.iterations=2", "eto.explore_tasks=4", "eto.batch_size=4", "eto.epochs=2", "eto.lrs=[1e-3]"]


@pytest.mark.slow
def test_eto_explores_pairs_and_trains_each_iteration_and_resumes_from_its_checkpoint(tmp_path):
    """`tiny_eto`: SFT, then ETO iterations that explore, pair against the expert, run DPO and evaluate; a run
    resumed from iteration 1's checkpoint ends with the same parameters and metrics."""
    config = load_config("tiny_eto", MICRO + ETO_MICRO + [f"run_dir={tmp_path}"])
    summary = train(config)
    assert list(summary["stages"]) == ["sft", "eto"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    eto = [r for r in records if r["stage"] == "eto"]
    assert [(r["iteration"], r["kind"]) for r in eto] == [(1, "train"), (1, "eval"), (2, "train"), (2, "eval")]
    trained = [r for r in eto if r["kind"] == "train"]
    assert all(r["explored"] == 4 and r["pairs"] >= 1 and r["updates"] >= 2 for r in trained), trained
    # A policy is its own reference at an iteration's first step: the DPO loss starts at log 2.
    assert all(abs(r["dpo_loss_first"] - np.log(2.0)) < 1e-5 for r in trained), trained
    experts = [json.loads(line) for line in (tmp_path / "eto_experts.jsonl").read_text().splitlines()]
    assert len(experts) == 4 and all(e["reward"] == 1.0 for e in experts)  # the expert without mistakes

    whole = leaves(tmp_path / "stages" / "eto" / "policy")
    before = _metrics_without_time(tmp_path)
    # Back to the end of iteration 1: the stage's results and its second checkpoint removed.
    shutil.rmtree(tmp_path / "stages" / "eto")
    shutil.rmtree(tmp_path / "checkpoints" / "eto" / "2")
    train(config)
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(whole, leaves(tmp_path / "stages" / "eto" / "policy"))) == 0.0
    assert _metrics_without_time(tmp_path) == before


def test_sft_ends_on_the_first_whole_window_of_losses_below_stop_loss():
    sft = SftSection(stop_loss=0.05, log_every=2)
    assert ends_on_loss(sft, [0.06, 0.03])  # mean 0.045
    assert not ends_on_loss(sft, [0.03, 0.08])  # one low loss is not enough: mean 0.055
    assert not ends_on_loss(sft, [0.01])  # a resumed run's partial window
    assert not ends_on_loss(dataclasses.replace(sft, stop_loss=0.0), [0.0, 0.0])  # 0: every epoch


def test_sft_stop_loss_ends_the_stage_early_and_a_restart_keeps_that_end(tmp_path):
    """A loss every window is below ends SFT at its first log point, evaluated and checkpointed there; restarted from
    that checkpoint, the stage trains and evaluates no more and returns the same policy."""
    config = load_config("tiny", MICRO + ["stages=[sft]", "sft.epochs=4", "sft.log_every=2", "sft.checkpoint_every=2",
                                          "sft.stop_loss=1000", f"run_dir={tmp_path}"])
    train(config)
    records = _metrics_without_time(tmp_path)
    assert [(r["kind"], r["iteration"]) for r in records if r["kind"] in ("train", "eval")] == [("train", 2),
                                                                                              ("eval", 2)]
    policy = leaves(tmp_path / "stages" / "sft" / "policy")

    shutil.rmtree(tmp_path / "stages" / "sft")  # as if killed after the stop's checkpoint, before the stage's result
    train(config)
    assert _metrics_without_time(tmp_path) == records
    assert all(np.array_equal(a, b) for a, b in zip(policy, leaves(tmp_path / "stages" / "sft" / "policy")))


def test_sft_stop_loss_is_checked():
    with pytest.raises(ConfigError, match="sft.stop_loss=-0.5 must be >= 0"):
        load_config("tiny", ["sft.stop_loss=-0.5"])
    with pytest.raises(ConfigError, match="checkpoint_every=15 to be a multiple of sft.log_every=10"):
        load_config("tiny", ["sft.checkpoint_every=15"])


def _untrained_apptown_model(folder):
    """A tiny random Qwen2 with a tokenizer trained on AppTown text, saved as a Hugging Face model folder."""
    from jaxagent.envs.apptown.env import SYSTEM_PROMPT
    from jaxagent.envs.apptown.tasks import expert_turns, make_task, split_tasks

    tasks = [make_task(t) for t in split_tasks("train")[:40]]
    texts = [SYSTEM_PROMPT] + [t.instruction + "\n" + "\n".join(expert_turns(t)) for t in tasks]
    return tiny_pretrained(folder, texts, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=2048)


def test_best_of_n_takes_each_tasks_best_rollout():
    from jaxagent.metrics import best_of_n, final_table, rollout_stats
    from jaxagent.trajectory import Trajectory

    def rollout(task, reward):
        mask = np.array([0, 1], np.int8)
        return Trajectory(np.array([1, 2], np.int32), mask, np.zeros(2, np.float32), np.array([-1, 0], np.int32),
                          reward, 0, 0, task, {"success": reward == 1.0})

    rollouts = [rollout("a", 0.2), rollout("a", 1.0), rollout("a", 0.0), rollout("b", 0.3), rollout("b", 0.1),
                rollout("b", 0.0)]
    assert best_of_n(rollouts) == {"best_of_n": 3, "best_of_n_reward": pytest.approx((1.0 + 0.3) / 2),
                                   "best_of_n_success": 0.5}
    assert best_of_n(rollouts[::3]) == {}  # one rollout per task: nothing to pick from
    table = final_table({"zero-shot": {**rollout_stats(rollouts), **best_of_n(rollouts)}})
    assert "best-of-N reward" in table and "0.650 (N=3)" in table


def test_behaviour_rates_per_rollout_and_per_turn_and_distinct_api_paths_of_successes():
    """The LOOP paper's behaviour analysis, counted by hand on three rollouts of one task and one of another."""
    from jaxagent.metrics import behaviour_stats, final_table, rollout_stats
    from jaxagent.trajectory import Trajectory

    def rollout(task, success, *turns, error_before_last=False):
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "task"}]
        for i, turn in enumerate(turns):
            messages.append({"role": "assistant", "content": turn})
            if i < len(turns) - 1:
                last = error_before_last and i == len(turns) - 2
                messages.append({"role": "user", "content": "Traceback: KeyError" if last else "ok"})
        ids = np.zeros(2, np.int32)
        return Trajectory(ids, np.array([0, 1], np.int8), np.zeros(2, np.float32), np.array([-1, 0], np.int32),
                          float(success), 0, 0, task, {"success": success, "termination": "completed"},
                          tuple(messages))

    docs = "```python\nprint(apis.api_docs.show_api_doc(app_name='venmo'))\n```"
    pay = "```python\napis.venmo.pay(to='a')\napis.supervisor.complete_task()\n```"
    pay_twice = "```python\napis.venmo.pay (to='a')\n```\n```python\napis.venmo.pay(to='b')\n```"
    guess = "I assume the id is 1.\n```python\napis.venmo.pay(to='dummy')\napis.supervisor.complete_task()\n```"
    rollouts = [rollout("a", True, docs, pay), rollout("a", True, pay_twice, pay), rollout("a", True, docs, pay),
                rollout("b", False, docs, guess, error_before_last=True)]
    stats = behaviour_stats(rollouts)
    turns = 8
    assert stats["doc_lookups"] == 3 / 4 and stats["doc_lookups_per_turn"] == 3 / turns
    assert stats["says_assume"] == 1 / 4 and stats["says_assume_per_turn"] == 1 / turns
    assert stats["placeholder_values"] == 1 / 4 and stats["placeholder_values_per_turn"] == 1 / turns
    assert stats["multi_cell_turns"] == 1 / 4 and stats["multi_cell_per_turn"] == 1 / turns
    assert stats["gives_up_after_error"] == 1 / 4
    # Task a's successes took two paths (pay, complete) and (pay, pay, pay, complete); b has no success.
    assert stats["api_sequences"] == 2.0
    assert "api_sequences" not in behaviour_stats(rollouts[3:])
    # The failure both used a placeholder and gave up: it counts as giving up; the three successes are the rest.
    assert stats["reward_gave_up"] == 0.0 and stats["reward_other"] == 1.0 and "reward_placeholder" not in stats
    guessed = rollout("b", False, docs, guess)
    assert behaviour_stats([guessed, rollouts[0]])["reward_placeholder"] == 0.0
    table = final_table({"eval": rollout_stats(rollouts)}).splitlines()
    assert table[0].split()[-3:] == ["assume", "multi", "paths"] and table[2].split()[-3:] == ["0.250", "0.25", "2.00"]


def test_evaluate_scores_a_model_folder_untrained_with_best_of_n(tmp_path):
    from jaxagent.evaluate import evaluate_model, main

    folder = _untrained_apptown_model(tmp_path / "model")
    settings = ["progress=false", "eval.tasks=3", "eval.rollouts_per_task=3", "rollout.max_turns=2",
                "rollout.max_tokens_per_turn=16", "rollout.max_context=1024", "rollout.max_concurrent=9"]
    stats, _ = evaluate_model(folder, "tiny", settings)
    assert stats["episodes"] == 9 and stats["best_of_n"] == 3
    assert stats["reward"] <= stats["best_of_n_reward"] <= 1.0 and stats["success"] <= stats["best_of_n_success"]
    with pytest.raises(Exception, match="--model needs --config NAME"):
        main(["--model", str(folder)])


@pytest.mark.parametrize("name", list(loop_algorithms.ALGORITHMS))
def test_each_algorithm_updates_the_policy(name, rollouts):
    setup, policy, config, trajectories = rollouts
    loop_cfg = dataclasses.replace(config.loop, minibatch_size=4, critic_warmup_iterations=0)
    update_config = UpdateConfig(loop_algorithms.loss_config(name, loop_cfg, 4, 1.0), config.optim)
    stage = loop_algorithms.RLStage(name, loop_algorithms.get_algorithm(name), loop_cfg, update_config,
                                    make_update_step(setup.model, update_config, None),
                                    LogprobComputer(setup.model, None, 1.0), frozen={})
    trainable = loop_algorithms.trainable_of(stage.algorithm, setup, policy)
    before = [np.asarray(x) for x in jax.tree.leaves(trainable)]
    state = init_train_state(jax.tree.map(lambda x: x.copy(), trainable), update_config)
    state, stats = loop_algorithms._learn(stage, state, trajectories, 1, np.random.default_rng(0),
                                          jax.random.key(1))
    # Group-relative advantages drop the rollout whose reward equals its group's mean (0.5 in [1, 0, 0.5]);
    # expert iteration keeps each group's best rollout when it succeeds.
    expected_kept = {"ei": 2, "reinforce": 6, "ppo": 6}.get(name, 5)
    assert stats["kept"] == expected_kept and stats["updates"] == config.loop.epochs * -(-expected_kept // 4)
    assert stats["sampler_learner_logprob_mismatch_max"] < 1e-4  # the learner recomputes what the sampler saw
    after = [np.asarray(x) for x in jax.tree.leaves(state.trainable)]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def _stage(name, setup, config, **loop_changes):
    loop_cfg = dataclasses.replace(config.loop, minibatch_size=4, critic_warmup_iterations=0, **loop_changes)
    update_config = UpdateConfig(loop_algorithms.loss_config(name, loop_cfg, 4, 1.0), config.optim,
                                 kl_stop=loop_cfg.kl_stop)
    return loop_algorithms.RLStage(name, loop_algorithms.get_algorithm(name), loop_cfg, update_config,
                                   make_update_step(setup.model, update_config, None),
                                   LogprobComputer(setup.model, None, 1.0), frozen={})


class ShiftedLogprobs:
    """The learner's old log-probs as if another policy had sampled the rollouts: 25 nats lower per model token."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, params, lora_params, value_head, trajectories, rows_per_call):
        logps, values = self.inner(params, lora_params, value_head, trajectories, rows_per_call)
        return [lp - 25.0 * t.model_mask for lp, t in zip(logps, trajectories)], values


def test_the_kl_guard_ends_an_iteration_and_the_next_one_trains(rollouts):
    setup, policy, config, trajectories = rollouts
    stage = _stage("loop", setup, config, kl_stop=20.0)
    shifted = dataclasses.replace(stage, logprobs=ShiftedLogprobs(stage.logprobs))
    before = [np.asarray(x) for x in jax.tree.leaves(policy.trainable())]
    state = init_train_state(jax.tree.map(lambda x: x.copy(), policy.trainable()), stage.update_config)
    state, stats = loop_algorithms._learn(shifted, state, trajectories, 1, np.random.default_rng(0),
                                          jax.random.key(1))
    # Every trajectory has a model token, so the first minibatch's KL estimate is below -20.
    assert stats["high_kl_stops"] == 1 and stats["updates"] == 0 and stats["trajectory_kl"] < -20.0
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(state.trainable)))
    state, stats = loop_algorithms._learn(stage, state, trajectories, 2, np.random.default_rng(1),
                                          jax.random.key(2))
    assert stats["high_kl_stops"] == 0 and stats["updates"] == config.loop.epochs * 2
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(state.trainable)))


def test_evaluation_can_decode_greedily(rollouts):
    """eval.temperature 0 (LOOP's reference evaluation): greedy decoding, so two rollouts of a task are identical."""
    setup, policy, config, _ = rollouts
    greedy = dataclasses.replace(config, eval=dataclasses.replace(config.eval, temperature=0.0, rollouts_per_task=2,
                                                                  tasks=2))
    stats, trajectories = evaluate(dataclasses.replace(setup, config=greedy), policy, seed=3)
    assert stats["episodes"] == 4
    by_task = {}
    for t in trajectories:
        by_task.setdefault(t.task_id, []).append(t.token_ids)
    assert all(len(ids) == 2 and np.array_equal(*ids) for ids in by_task.values())


def test_leave_one_out_filter_drops_groups_without_signal(rollouts):
    _, _, config, trajectories = rollouts
    equal = [dataclasses.replace(t, reward=0.5) for t in trajectories]
    advantages, keep = loop_algorithms.trajectory_advantages("loop", equal, config.loop)
    assert not keep.any() and np.allclose(advantages, 0.0)
    advantages, keep = loop_algorithms.trajectory_advantages("loop", trajectories, config.loop)
    np.testing.assert_allclose(advantages[:3], [1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5])
    assert keep.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def test_the_advantage_setting_replaces_the_stages_own_estimator(rollouts):
    """tiny_rwnorm: LOOP's leave-one-out advantage divided by the group's population reward std (rewards of the
    first group 1, 0, 0.5: std sqrt(1/6))."""
    _, _, config, trajectories = rollouts
    rwnorm = load_config("tiny_rwnorm").loop
    assert rwnorm.advantage == "leave_one_out_norm"
    advantages, _ = loop_algorithms.trajectory_advantages("loop", trajectories, rwnorm)
    np.testing.assert_allclose(advantages[:3], np.array([0.75, -0.75, 0.0]) / np.sqrt(1 / 6), rtol=1e-5)
    plain, _ = loop_algorithms.trajectory_advantages("loop", trajectories, config.loop)
    assert not np.allclose(advantages, plain)
    with pytest.raises(ConfigError, match="loop.advantage='leave_one_out_norm' does not apply to stage ppo"):
        load_config("tiny_ppo", ["loop.advantage=leave_one_out_norm"])
    with pytest.raises(ConfigError, match="loop.advantage='mean'; valid: leave_one_out, "):
        load_config("tiny", ["loop.advantage=mean"])


def _train_cli(run_dir, *extra):
    return subprocess.Popen(micro_train_command(run_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _metrics_without_time(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["sft/2", "loop/1"])
def test_sigkill_then_restart_equals_an_uninterrupted_run(kill_when, tmp_path, micro_run):
    """Kill with SIGKILL once the named checkpoint exists (the next iteration is under way), restart the same
    command: it resumes, finishes, and every final parameter and every metric equals an uninterrupted run's."""
    whole, out_ref = micro_run
    killed = tmp_path / "killed"
    victim = _train_cli(killed)
    marker = killed / "checkpoints" / kill_when
    deadline = time.time() + 240
    while not marker.is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (killed / "summary.json").exists()
    restarted = _train_cli(killed)
    out, err = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, err[-2000:]
    assert "resumed from the checkpoint of iteration" in out
    for stage in ("sft", "loop"):
        for a, b in zip(leaves(whole / "stages" / stage / "policy"), leaves(killed / "stages" / stage / "policy")):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _metrics_without_time(whole) == _metrics_without_time(killed)
    assert out.split("held-out evaluation")[1] == out_ref.split("held-out evaluation")[1].replace(str(whole),
                                                                                                   str(killed))


@pytest.mark.slow
def test_evaluate_repeats_the_final_table(micro_run):
    run_dir, out = micro_run
    summary = json.loads((run_dir / "summary.json").read_text())
    results = evaluate_run(run_dir)
    for stage, stats in results.items():
        assert stats["success"] == summary["stages"][stage]["eval_success"]
        assert stats["reward"] == summary["stages"][stage]["eval_reward"]
        assert stats["turns"] == summary["stages"][stage]["eval_turns"]
    cli = subprocess.run([sys.executable, "-m", "jaxagent.evaluate", "--run", str(run_dir)], capture_output=True,
                         text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    table = out.split("held-out evaluation")[1].split("run folder:")[0]
    assert table in "held-out evaluation" + cli.stdout.split("held-out evaluation")[1] + "\n" or \
        table.strip() in cli.stdout


@pytest.mark.slow
def test_a_run_can_start_from_another_runs_finished_stage(micro_run, tmp_path):
    """init_from loads the stage's weights, architecture and tokenizer: a stage that leaves the policy unchanged
    saves exactly the weights it started from, under the source run's tokenizer."""
    source = micro_run[0] / "stages" / "sft"
    train(load_config("tiny", MICRO + [f"init_from={source}", "stages=[collect]", "collect.tasks=1",
                                       "collect.rollouts_per_task=1", "eval.tasks=1", f"run_dir={tmp_path}"]))
    for saved, started in zip(leaves(tmp_path / "stages" / "collect" / "policy"), leaves(source / "policy")):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(started))
    tokenizer = "tokenizer.json"
    assert (tmp_path / "stages" / "collect" / "policy" / "model" / tokenizer).read_bytes() == \
        (source / "policy" / "model" / tokenizer).read_bytes()
    assert not (tmp_path / "tokenizer").exists()  # no tokenizer of its own was trained
    with pytest.raises(ConfigError, match="init_from=.*neither a finished stage's folder"):
        train(load_config("tiny", MICRO + [f"init_from={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'bad'}"]))


def test_length_grouped_sft_batches_visit_every_demo_once_with_less_padding():
    """Grouping by length cuts each batch's padding (a batch pads to its longest row) while an epoch still visits
    every demonstration once, in as many batches as without grouping, drawn again identically on a resume."""
    from jaxagent.algorithms.sft import epoch_batches

    lengths = list(np.random.default_rng(0).integers(50, 800, 1000))
    padded = {}
    for grouped in (False, True):
        batches = epoch_batches(lengths, 16, grouped, np.random.default_rng([0, 0, 3]))
        assert sorted(np.concatenate(batches).tolist()) == list(range(1000)) and len(batches) == 63
        again = epoch_batches(lengths, 16, grouped, np.random.default_rng([0, 0, 3]))
        assert all(np.array_equal(a, b) for a, b in zip(batches, again))
        padded[grouped] = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded[True] < 0.7 * padded[False]


TENSORBOARD_PROBE = """
import struct, sys
from pathlib import Path
from jaxagent.metrics import MetricsLog
run = Path(sys.argv[1])
log = MetricsLog(run)
log.write({"stage": "loop", "kind": "train", "iteration": 3, "stage_index": 1, "reward": 0.25}, 7)
log.close()  # tensorboardX writes from a queue: on disk for sure once closed
print("torch" in sys.modules)
from tensorboardX.proto import event_pb2
data = next((run / "tensorboard").glob("events.out.tfevents*")).read_bytes()
offset, scalars = 0, []
while offset < len(data):  # TFRecord: length (8 bytes), its CRC (4), the Event, its CRC (4)
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    scalars += [(v.tag, v.simple_value, event.step) for v in event.summary.value]
    offset += 16 + length
print(scalars)
import torch  # hidden only while tensorboardX was imported
print(torch.__name__)
"""


def test_tensorboard_scalars_are_written_without_importing_torch(tmp_path):
    probe = subprocess.run([sys.executable, "-c", TENSORBOARD_PROBE, str(tmp_path)], capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.splitlines() == ["False", "[('loop/train/reward', 0.25, 7)]", "torch"]
