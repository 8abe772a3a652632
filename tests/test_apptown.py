"""AppTown: the expert solves every task of every split; mistakes lower the reward; bad input is refused."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from jaxagent.envs.apptown import AppTownEnv
from jaxagent.envs.apptown.tasks import SPLIT_SEEDS, TEMPLATES, expert_turns, make_task, split_tasks
from jaxagent.envs.base import EnvError
from jaxagent.envs.registry import list_tasks, make_env


def _play(env: AppTownEnv, turns: list[str]) -> float:
    env.reset()
    try:
        for turn in turns:
            result = env.step(turn)
            if result.done:
                return result.reward
        return env.evaluate().reward
    finally:
        env.close()


@pytest.mark.slow
@pytest.mark.parametrize("split", list(SPLIT_SEEDS))
def test_the_expert_without_mistakes_solves_every_task(split):
    def reward_of(task_id: str) -> tuple[str, float]:
        env = AppTownEnv(task_id)
        return task_id, _play(env, expert_turns(env.task, 0.0))

    # Train: the tasks of every 5th seed (200 of 1,000, 40 per template) keep the suite's time down; dev and test
    # are played whole.
    tasks = split_tasks(split)
    if split == "train":
        tasks = [t for t in tasks if int(t.split("/")[1]) % 5 == 0]
    with ThreadPoolExecutor(8) as pool:  # episodes wait on their sandboxes, so threads overlap them
        rewards = dict(pool.map(reward_of, tasks))
    assert len(rewards) == len(tasks)
    assert {t: r for t, r in rewards.items() if r != 1.0} == {}


def test_reward_falls_as_the_mistake_rate_rises():
    tasks = split_tasks("dev")[:40]
    means = []
    for rate in (0.0, 0.4, 0.8):
        rewards = [_play(AppTownEnv(t), expert_turns(make_task(t), rate, random.Random(i))) for i, t in
                   enumerate(tasks)]
        means.append(sum(rewards) / len(rewards))
    assert means[0] == 1.0 and means[0] > means[1] > means[2], means


def test_tasks_need_a_look_up_and_cannot_be_guessed():
    task = make_task("message/5")
    env = AppTownEnv("message/5")
    env.reset()
    guessed = env.step("```python\napis.messages.send(to='555-0000', text='hi')\n```")
    assert "no phone number '555-0000'" in guessed.observation and not guessed.done
    done = env.step("```python\napis.supervisor.complete_task()\n```")
    assert done.done and done.reward == 0.25 and done.info["tests_passed"] == 1  # only "completed" passes
    env.close()
    assert task.target["phone"] in {c["phone"] for c in task.state["contacts"]}


def test_turn_without_code_and_unterminated_block():
    env = AppTownEnv("balance/1")
    env.reset()
    assert "No code found" in env.step("I am thinking.").observation
    assert env.parse_action("```python\nprint(1)") == "print(1)"
    result = env.step("```python\nprint(apis.wallet.balance())")
    assert float(result.observation) == make_task("balance/1").state["wallet"]["balance"]
    env.close()


def test_splits_are_disjoint_and_named():
    train, dev, test = (set(list_tasks("apptown", s)) for s in ("train", "dev", "test"))
    assert len(train) == 200 * len(TEMPLATES) and len(test) == 40 * len(TEMPLATES)
    assert not (train & dev) and not (train & test) and not (dev & test)
    with pytest.raises(EnvError, match="has no split 'valid'; valid: train, dev, test"):
        list_tasks("apptown", "valid")
    with pytest.raises(EnvError, match="unknown environment 'webshop'; valid: apptown, appworld, scienceworld"):
        make_env("webshop", "x/1")
    with pytest.raises(ValueError, match="unknown AppTown task 'send/1'"):
        make_env("apptown", "send/1")


def test_the_expert_opens_with_the_goal_quoting_the_task():
    """The goal line restates the task: every fact it quotes is quoted the same way in the instruction."""
    import re

    for task_id in split_tasks("dev"):
        task = make_task(task_id)
        first = expert_turns(task, mistake_rate=1.0, rng=random.Random(0))[0]
        assert first.startswith("Goal: "), first
        goal_line = first.split(". ", 1)[0]
        quoted = re.findall(r"'([^']*)'", goal_line)
        assert len(quoted) == {"message": 2, "reply": 2, "pay": 1, "email": 1, "balance": 0}[task.template]
        assert all(f"'{fact}'" in task.instruction for fact in quoted), (goal_line, task.instruction)
        if task.template == "pay":
            assert f"${task.target['amount']:g} " in goal_line and f"${task.target['amount']:g} " in task.instruction


def test_the_world_lives_outside_the_agents_interpreter():
    """Agent code reaches the world through its APIs only: no object in its namespace holds the state the unit
    tests read, and a path that is not an API is refused by the harness."""
    env = AppTownEnv(split_tasks("train")[0])
    env.reset()
    try:
        assert "AttributeError" in env.run_cell("apis.wallet._world")
        assert "has no API 'state'" in env.run_cell("print(apis.wallet.state())")
        assert "no contact with phone" in env.run_cell("apis.contacts.show(phone='nobody')")  # the API's own error
        names = env.run_cell("print(sorted(n for n in globals() if not n.startswith('__')))")
        assert names == "['apis']"
        assert env.completed() is None
        env.run_cell("apis.supervisor.complete_task()")
        assert env.completed() is not None  # the same state, changed through the API
    finally:
        env.close()


def test_an_unknown_isolation_is_refused_before_the_run_starts():
    from jaxagent.envs.apptown import SPEC

    with pytest.raises(EnvError, match="isolation='bogus'; valid: namespaces, python"):
        SPEC.start({"isolation": "bogus"}, 1)
    assert SPEC.start({}, 1) is None
