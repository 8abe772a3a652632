"""ColBench's backend environment: offline tasks whose hidden details decide the tests, the scripted user and expert,
the official schema, and answers scored in the sandbox (hostile ones included) without harm to the trainer."""

from __future__ import annotations

import json
import os
import random

import pytest

from jaxagent.envs.base import EnvError
from jaxagent.envs.colbench import SPEC, Service
from jaxagent.envs.colbench.families import FAMILIES
from jaxagent.envs.colbench.scoring import same_value
from jaxagent.envs.colbench.simulator import DONT_KNOW, MAX_REPLY_CHARS
from jaxagent.envs.colbench.tasks import (
    ANSWER_MARKER,
    OFFLINE_SPLITS,
    _combinations,
    answer_turn,
    expert_turns,
    offline_split,
    offline_task,
)
from jaxagent.envs.registry import list_tasks, make_env


def _outputs(code: str, fn: str, arguments: list[str]) -> list[str]:
    """Our own generated reference code, run here to check the generator (agent code never runs in-process)."""
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the task generator's code, not model-written
    return [repr(namespace[fn](*eval(args))) for args in arguments]  # noqa: S307


@pytest.fixture(scope="module")
def service():
    shared = Service({})
    yield shared
    shared.close()


def _play(service, task_id: str, turns: list[str]):
    env = make_env("colbench", task_id, 0, service)
    env.reset()
    for turn in turns:
        result = env.step(turn)
        if result.done:
            return result
    return None


def test_splits_are_large_disjoint_and_take_the_families_in_turn():
    splits = {split: offline_split(split) for split in OFFLINE_SPLITS}
    assert len(splits["train"]) > 4000 and len(splits["dev"]) > 50 and len(splits["test"]) > 200
    combination = lambda task_id: task_id.rsplit("/", 1)[0]  # noqa: E731
    train = {combination(t) for t in splits["train"]}
    assert not train & {combination(t) for t in splits["test"]}
    assert not train & {combination(t) for t in splits["dev"]}
    assert {t.split("/")[0] for t in splits["test"][:len(FAMILIES)]} == set(FAMILIES)
    with pytest.raises(EnvError, match="environment 'colbench' has no split 'valid'; valid: train, dev, test"):
        list_tasks("colbench", "valid")


def test_every_hidden_detail_changes_some_test_call_and_no_reference_output_is_none():
    """For every combination of every family: changing any one hidden detail to any other value of its grid
    changes the output of at least one test call (so a wrong guess cannot pass), and the reference never returns
    None (such calls would not count)."""
    for family in FAMILIES.values():
        for params in _combinations(family):
            arguments = family.arguments(params)
            assert len(arguments) >= 8
            reference = _outputs(family.code("f", params), "f", arguments)
            assert "None" not in reference, (family.name, params)
            for fact in family.facts(params):
                for name in fact.params:
                    for value in family.grid[name]:
                        if value != params[name]:
                            changed = _outputs(family.code("f", {**params, name: value}), "f", arguments)
                            assert changed != reference, (family.name, params, name, value)


def test_every_expert_question_is_answered_with_exactly_its_fact_and_a_vague_one_is_not():
    from jaxagent.envs.colbench.simulator import ScriptedSimulator

    simulator = ScriptedSimulator()
    for family in FAMILIES.values():
        task = offline_task(f"{family.name}/0/0")
        for fact in task.facts:
            assert simulator.reply(task, [], fact.question) == fact.answer, (family.name, fact.question)
        assert simulator.reply(task, [], "Could you tell me a bit more about what you need?") == DONT_KNOW
        assert task.ground_truth not in task.problem_description
    long = offline_task("grade/0/0")
    assert len(simulator.reply(long, [], " ".join(f.question for f in long.facts) * 50)) <= MAX_REPLY_CHARS


def test_the_scripted_expert_reaches_reward_one_on_every_offline_task(service):
    """On every task of every split the expert asks every fact's question and answers with exactly the reference's
    code (whose outputs are never None, above), so its reward is 1.0; one task per family and split is played
    through the environment and its sandbox to show it."""
    for split in OFFLINE_SPLITS:
        for task_id in offline_split(split):
            task = offline_task(task_id)
            turns = expert_turns(task)
            assert turns[:-1] == [fact.question for fact in task.facts]
            assert turns[-1] == answer_turn(task.ground_truth), task_id
        for task_id in offline_split(split)[:len(FAMILIES)]:
            result = _play(service, task_id, expert_turns(offline_task(task_id)))
            assert result.reward == 1.0 and result.info["success"], (task_id, result)


def test_answering_at_once_scores_clearly_lower(service):
    tasks = [offline_task(t) for t in offline_split("test")]
    rewards = []
    for task in tasks:
        family = FAMILIES[task.family]
        guess = family.code(task.function_name, {**task.params, **family.defaults})
        calls = list(task.test_cases.values())
        ours = _outputs(guess, task.function_name, [c[len(task.function_name):] for c in calls])
        theirs = _outputs(task.ground_truth, task.function_name, [c[len(task.function_name):] for c in calls])
        rewards.append(sum(same_value(a, b) for a, b in zip(ours, theirs)) / len(calls))
    assert sum(rewards) / len(rewards) < 0.4 and sum(r == 1.0 for r in rewards) / len(rewards) < 0.05
    # The same through the environment for a few: the expert's "answer at once" mistake.
    for task_id in offline_split("test")[:4]:
        at_once = expert_turns(offline_task(task_id), 1.0, random.Random(0))
        assert len(at_once) == 1
        assert _play(service, task_id, at_once).reward < 1.0


def test_mistakes_make_realistic_dialogues():
    task = offline_task(offline_split("train")[0])
    kinds = {}
    for seed in range(40):
        turns = expert_turns(task, 0.5, random.Random(seed))
        kinds.setdefault(len(turns) - 1, turns)
    assert 0 in kinds and len(task.facts) in kinds  # answered at once; asked everything
    assert any(t[0] == "Could you tell me a bit more about what you need?" for t in kinds.values())


def test_hostile_answers_score_zero_and_the_trainer_carries_on(service):
    task_id = offline_split("test")[0]
    fn = offline_task(task_id).function_name
    hostile = {
        "eats memory": f"def {fn}(*args):\n    return len(bytearray(8 * 1024 ** 3))",
        "forks": f"import os\ndef {fn}(*args):\n    while True:\n        os.fork()",
        "kills its parent": f"import os, signal\ndef {fn}(*args):\n    os.kill(os.getppid(), signal.SIGKILL)",
        "equals everything": f"class Any:\n    def __eq__(self, other):\n        return True\n"
                             f"def {fn}(*args):\n    return Any()",
        "prints a forged result": f"def {fn}(*args):\n    print(100.0)\n    raise SystemExit(0)",
        "exits": "raise SystemExit(3)",
        "not python": "this is not code (",
    }
    for name, code in hostile.items():
        result = _play(service, task_id, [f"{ANSWER_MARKER}\n```python\n{code}\n```"])
        assert result.done and result.reward == 0.0 and not result.info["success"], (name, result)
    assert os.getpid() and _play(service, task_id, expert_turns(offline_task(task_id))).reward == 1.0
    # The right function, but each call takes longer than its 1 s limit (a hang ends the same way).
    slow = offline_task(task_id).ground_truth.replace("):\n", "):\n    __import__('time').sleep(1.2)\n", 1)
    assert _play(service, task_id, [answer_turn(slow)]).reward == 0.0


def test_ten_turns_without_an_answer_end_with_reward_zero(service):
    task_id = offline_split("dev")[0]
    env = make_env("colbench", task_id, 0, service)
    messages = env.reset()
    assert offline_task(task_id).ground_truth not in json.dumps(messages)
    results = [env.step("What should it do?") for _ in range(10)]
    assert [r.done for r in results] == [False] * 9 + [True] and results[-1].reward == 0.0
    assert env.training_info() == offline_task(task_id).ground_truth


def test_official_records_are_read_and_played(tmp_path, service):
    reference = "def add_all(xs, ys):\n    return [x + y for x, y in zip(xs, ys)]\n"
    record = {"problem_description": "I need a function that combines two lists.", "ground_truth": reference,
              "test_cases": json.dumps({f"test{i}": f"add_all({[i, 2]}, {[3, i]})" for i in range(9)})}
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    options = {"data": str(tmp_path)}
    assert list_tasks("colbench", "test", options) == ["test/0", "test/1"]
    official = Service(options)
    right = make_env("colbench", "test/1", 0, official)
    right.reset()
    assert right.step(answer_turn(reference)).reward == 1.0
    wrong = make_env("colbench", "test/1", 0, official)
    wrong.reset()
    assert wrong.step(answer_turn("def add_all(xs, ys):\n    return xs + ys")).reward == 0.0
    with pytest.raises(EnvError, match="the scripted simulator needs an offline task"):
        wrong.reset()
        wrong.step("What should it do?")
    (tmp_path / "test.jsonl").write_text('{"problem_description": "x"}\n')
    with pytest.raises(EnvError, match="test.jsonl:1: expected a JSON object with problem_description"):
        list_tasks("colbench", "test", options)


def test_bad_options_are_refused_with_what_is_valid(tmp_path):
    with pytest.raises(EnvError, match="unknown ColBench option.s. simulater in env.options; valid: data, simulator"):
        list_tasks("colbench", "train", {"simulater": "scripted"})
    with pytest.raises(EnvError, match="simulator=.human. is not a ColBench simulator; valid: scripted, openai, local"):
        Service({"simulator": "human"})
    with pytest.raises(EnvError, match="no train.jsonl there"):
        list_tasks("colbench", "train", {"data": str(tmp_path)})
    with pytest.raises(EnvError, match="unknown ColBench task 'discount/9999/0'"):
        offline_task("discount/9999/0")
    assert SPEC.name == "colbench"
    from jaxagent.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="collect.rollouts_per_task=0 must be >= 1"):
        load_config("tiny", ["stages=[sft,collect]", "collect.rollouts_per_task=0"])


@pytest.mark.slow
def test_the_collect_stage_saves_episodes_with_the_hidden_reference_for_the_critic_only(tmp_path):
    """`stages=[sft,collect]` on ColBench: SFT on scripted dialogues, then K rollouts per training task written to
    trajectories.jsonl with each task's reference as training-time information, which no prompt contains."""
    import subprocess

    from conftest import micro_train_command

    run = tmp_path / "run"
    proc = subprocess.run(micro_train_command(run, "env.name=colbench", "stages=[sft,collect]", "collect.tasks=3",
                                              "collect.rollouts_per_task=2", "rollout.max_context=1024",
                                              "eval.tasks=2"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from jaxagent.sweet_data import INFO_HEADER, critic_messages, read_trajectories

    lines = read_trajectories(run / "stages" / "collect" / "trajectories.jsonl")  # what the critic will read
    assert len(lines) == 6 and sorted(r["rollout_index"] for r in lines) == [0, 0, 0, 1, 1, 1]
    for line in lines:
        reference = offline_task(line["task"]["task_id"]).ground_truth
        assert line["task"]["training_info"] == reference and 0.0 <= line["reward"] <= 1.0
        assert line["messages"][1]["content"] == offline_task(line["task"]["task_id"]).problem_description
        assert reference not in json.dumps(line["messages"])
        assert critic_messages(line)[0]["content"].startswith(INFO_HEADER + reference.strip())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["episodes"] for r in records if r["kind"] == "collect"] == [6]
    # The policy did not change, so the stage's held-out result is the SFT stage's.
    results = [json.loads((run / "stages" / s / "result.json").read_text()) for s in ("sft", "collect")]
    assert results[0] == results[1]
