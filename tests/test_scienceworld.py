"""ScienceWorld through the package: gold trajectories reach the maximum score through our wrapper."""

from __future__ import annotations

import pytest

from jaxagent.envs.base import EnvError
from jaxagent.envs.scienceworld import (
    SIMPLIFICATION,
    JvmPool,
    ScienceWorldEnv,
    game_reset,
    game_step,
    parse_task_id,
    require_java,
    split_tasks,
)

SAMPLE = ["boil", "chemistry-mix", "find-animal", "grow-plant", "measure-melting-point-known-substance",
          "use-thermometer", "identify-life-stages-1", "test-conductivity"]


@pytest.fixture(scope="module")
def pool():
    require_java()
    jvms = JvmPool(2)
    yield jvms
    jvms.close()


@pytest.mark.slow
def test_gold_trajectories_reach_the_maximum_score(pool):
    tasks = split_tasks("test")
    for name in SAMPLE:
        task_id = next(t for t in tasks if parse_task_id(t)[0] == name)
        env = ScienceWorldEnv(task_id, pool=pool)
        env.reset()
        result = None
        for turn in env.gold_turns():
            result = env.step(turn)
            if result.done:
                break
        env.close()
        assert result is not None and result.done and result.reward == 1.0, (task_id, result)


def test_our_step_equals_the_packages_step_along_a_gold_path(pool):
    """`game_step` skips the package's info dict; observation, score and end must equal the package's `step`."""
    ours, theirs = pool.acquire(), pool.acquire()
    try:
        for jvm in (ours, theirs):
            jvm.load("boil", 0, SIMPLIFICATION, generateGoldPath=True)
        gold = list(theirs.get_gold_action_sequence())
        assert game_reset(ours) == theirs.reset()[0]
        for action in gold + ["look around"]:  # and one step after the game ended
            observation, _, done, info = theirs.step(action)
            assert game_step(ours, action) == (observation, done, info["score"]), action
        assert done and info["score"] == 100
    finally:
        pool.release(ours)
        pool.release(theirs)


def test_actions_are_parsed_from_the_eto_format(pool):
    env = ScienceWorldEnv("boil/0", pool=pool)
    messages = env.reset()
    assert "boil" in messages[1]["content"] and "Action:" in messages[0]["content"]
    assert env.parse_action("Thought: go.\nAction: look around") == "look around"
    assert env.step("I will look.").observation.startswith("No action found")
    result = env.step("Thought: I look.\nAction: look around")
    assert "This room is called" in result.observation and not result.done
    assert env.evaluate().reward == 0.0
    env.close()


def test_splits_and_ids():
    train, test = split_tasks("train"), split_tasks("test")
    assert len(train) > 3000 and len(test) > 1000 and not set(train) & set(test)
    with pytest.raises(EnvError, match="bad ScienceWorld task id 'boil'"):
        parse_task_id("boil")
    with pytest.raises(EnvError, match="unknown ScienceWorld split 'valid'"):
        split_tasks("valid")


def test_missing_java_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EnvError, match="apt-get install -y default-jre-headless"):
        require_java()
