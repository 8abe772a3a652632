"""ScienceWorld through the package: gold trajectories reach the maximum score through our wrapper."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from jaxagent.envs import scienceworld
from jaxagent.envs.base import EnvError
from jaxagent.envs.scienceworld import (
    ETO_STEP_LIMITS,
    JVM_HEAP,
    SIMPLIFICATION,
    SPEC,
    JvmPool,
    ScienceWorldEnv,
    game_reset,
    game_step,
    parse_task_id,
    require_java,
    split_tasks,
)

from conftest import tiny_pretrained

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
    """`game_step` skips the package's info dict; observation, score and end must equal the package's `step`.
    (A mixing task: its 18 gold actions raise the score in several steps; boil's 87 would take ~30 s of package
    steps.)"""
    ours, theirs = pool.acquire(), pool.acquire()
    try:
        for jvm in (ours, theirs):
            jvm.load("chemistry-mix", 0, SIMPLIFICATION, generateGoldPath=True)
        gold = list(theirs.get_gold_action_sequence())
        assert game_reset(ours) == theirs.reset()[0]
        for action in gold + ["look around"]:  # and one step after the game ended
            observation, _, done, info = theirs.step(action)
            assert game_step(ours, action) == (observation, done, info["score"]), action
        assert done and info["score"] == 100
    finally:
        pool.release(ours)
        pool.release(theirs)


def test_a_runs_episodes_borrow_the_jvms_of_one_pool():
    """A run starts ScienceWorld's service once (`build_setup`); its episodes reuse that pool's JVMs instead of
    starting one each (a JVM costs seconds of CPU to start and warm up)."""
    from jaxagent.envs.registry import make_env, start_service

    require_java()
    service = start_service("scienceworld", {}, concurrency=1)
    try:
        jvms = []
        for variation in (0, 1):
            env = make_env("scienceworld", f"find-animal/{variation}", 0, service)
            env.reset()
            jvms.append(env._current().jvm)
            env.close()
        assert jvms[0] is jvms[1] and service.capacity == 1
    finally:
        service.close()


class FakeJvm:
    """Stands in for a JVM where only the pool's bookkeeping is tested."""

    def __init__(self, *args, **kwargs):
        self.closed = False

    def close(self):
        self.closed = True


def test_jvms_left_idle_are_stopped_and_busy_ones_are_not(monkeypatch):
    """A run's pool stops JVMs idle past `idle_stop_s` (an update phase between collections), so that they do not
    hold their memory; a JVM an episode holds is never stopped, and the next episode gets a new JVM."""
    monkeypatch.setattr(scienceworld, "_new_jvm", FakeJvm)
    pool = JvmPool(2, wait_s=1.0, idle_stop_s=0.2)
    try:
        idle, busy = pool.acquire(), pool.acquire()
        pool.release(idle)
        deadline = time.monotonic() + 10
        while not idle.closed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert idle.closed and not busy.closed
        fresh = pool.acquire()  # the stopped JVM's slot is free again: a new JVM, not a wait for the busy one
        assert fresh is not idle and not fresh.closed
    finally:
        pool.close()
    pool.release(busy)  # an episode that ends after its run closed the pool: its JVM stops too
    assert busy.closed
    with pytest.raises(EnvError, match="pool is closed"):
        pool.acquire()


def test_jvms_started_at_once_all_get_the_heap_cap_and_the_environment_is_restored(monkeypatch):
    """JVM starts on several threads each see `JVM_HEAP` in JAVA_TOOL_OPTIONS, and once they are done the variable
    is as it was: a start that overlaps another must neither leave the cap set for the rest of the process nor take
    it away from a JVM still starting."""
    import scienceworld as package

    seen, order = [], []

    class SlowFakeJvm(FakeJvm):
        def __init__(self, *args, **kwargs):
            super().__init__()
            order.append(self)
            seen.append(os.environ.get("JAVA_TOOL_OPTIONS"))
            time.sleep(0.1 * len(order))  # the first start ends first, while the others are still starting

    monkeypatch.setattr(scienceworld, "require_java", lambda: None)
    monkeypatch.setattr(package, "ScienceWorldEnv", SlowFakeJvm)
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Dsome.user=option")
    threads = [threading.Thread(target=scienceworld._new_jvm) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    assert len(seen) == 3 and all(s is not None and JVM_HEAP in s and "-Dsome.user=option" in s for s in seen)
    assert os.environ["JAVA_TOOL_OPTIONS"] == "-Dsome.user=option"


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


def test_the_split_table_is_read_from_the_game_once_then_from_its_file(tmp_path, monkeypatch):
    """The first process reads the splits from a JVM and keeps them; later ones read the file and start no JVM; a
    damaged file is read again from the game."""
    from jaxagent.envs import scienceworld

    monkeypatch.setenv("JAXAGENT_CACHE_DIR", str(tmp_path))
    scienceworld._variations.cache_clear()
    try:
        table = scienceworld._variations()  # from the game: no file yet
        path = scienceworld.variations_file()
        assert path.parent == tmp_path / "scienceworld" and json.loads(path.read_text()) == table
        assert len(table) == 30 and all(not set(t["train"]) & set(t["test"]) for t in table.values())

        def no_jvm(*args, **kwargs):
            raise AssertionError("a JVM was started to read the split table")

        monkeypatch.setattr(scienceworld, "_new_jvm", no_jvm)
        scienceworld._variations.cache_clear()
        assert scienceworld._variations() == table

        path.write_text('{"boil": {"train": [0]')  # cut short
        monkeypatch.setattr(scienceworld, "_variations_from_jvm", lambda: {"boil": {"train": [0], "dev": [1],
                                                                                     "test": [2]}})
        scienceworld._variations.cache_clear()
        assert scienceworld._variations() == json.loads(path.read_text()) == {"boil": {"train": [0], "dev": [1],
                                                                                        "test": [2]}}
    finally:
        scienceworld._variations.cache_clear()  # later tests read the suite's own file again


def test_seen_and_unseen_name_dev_and_test_and_the_eto_protocol_keeps_its_24_types_in_turn():
    assert split_tasks("seen") == split_tasks("dev") and split_tasks("unseen") == split_tasks("test")
    types = lambda tasks: [parse_task_id(t)[0] for t in tasks]  # noqa: E731
    unseen = split_tasks("unseen", "eto")
    assert set(types(unseen)) == set(ETO_STEP_LIMITS) and len(ETO_STEP_LIMITS) == 24
    assert set(unseen) < set(split_tasks("test")) and "inclined-plane-determine-angle" in types(split_tasks("test"))
    # Types taken in turn: the first 24 tasks are one of each, so `eval.tasks: N` is an even sample.
    assert sorted(types(unseen[:24])) == sorted(ETO_STEP_LIMITS)
    finds = split_tasks("seen", "eto", ["find-plant", "find-animal"])
    assert sorted(types(finds[:2])) == sorted(types(finds[2:4])) == ["find-animal", "find-plant"]
    assert set(types(finds)) == {"find-plant", "find-animal"}
    with pytest.raises(EnvError, match="'mendelian-genetics-known-plant', not a task type of protocol 'eto'"):
        split_tasks("train", "eto", ["find-plant", "mendelian-genetics-known-plant"])
    with pytest.raises(EnvError, match="protocol='paper' is not a ScienceWorld protocol; valid: package, eto"):
        split_tasks("test", "paper")
    with pytest.raises(EnvError, match="unknown ScienceWorld option.s. steps in env.options; valid: protocol, types"):
        SPEC.tasks("test", {"steps": 3})
    with pytest.raises(EnvError, match="'inclined-plane-determine-angle/0' is not one of the 24 types"):
        ScienceWorldEnv("inclined-plane-determine-angle/0", protocol="eto")


def test_the_eto_protocol_ends_episodes_at_the_types_step_limit_but_lets_the_expert_finish(pool):
    task = next(t for t in split_tasks("test", "eto") if t.startswith("lifespan-longest-lived/"))
    for protocol, limit in (("eto", ETO_STEP_LIMITS["lifespan-longest-lived"]), ("package", 50)):
        env = ScienceWorldEnv(task, pool=pool, protocol=protocol)
        env.reset()
        ends = [env.step("Thought: look.\nAction: look around").done for _ in range(limit)]
        env.close()
        assert ends == [False] * (limit - 1) + [True], (protocol, ends)
    env = ScienceWorldEnv("boil/0", pool=pool, protocol="eto")
    env.reset()
    gold = env.gold_turns()
    assert len(gold) > 0 and env._current().step_limit == max(ETO_STEP_LIMITS["boil"], len(gold))
    env.close()


def test_missing_java_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EnvError, match="apt-get install -y default-jre-headless"):
        require_java()


def _tiny_scienceworld_llama(folder):
    """A tiny random Llama with a tokenizer trained on ScienceWorld text, saved as a Hugging Face model folder."""
    from jaxagent.envs.scienceworld import SYSTEM_PROMPT

    env = ScienceWorldEnv("boil/0")
    try:
        texts = [SYSTEM_PROMPT] + [m["content"] for m in env.reset()] + env.gold_turns()
    finally:
        env.close()
    return tiny_pretrained(folder, texts * 3, vocab_size=1024, family="Llama", max_position_embeddings=16384)


@pytest.mark.slow
def test_the_eto_scienceworld_config_runs_a_short_iteration_and_evaluates_seen_and_unseen(tmp_path):
    """`eto_scienceworld_llama2_7b` with a tiny model: SFT on gold paths, one ETO iteration (explore two training
    variations of two short task types, pairs against their gold paths, DPO), evaluation on unseen (test)
    variations, then seen (dev) ones as `jaxagent.evaluate --split seen` does."""
    import json
    import subprocess
    import sys

    from jaxagent.evaluate import evaluate_run

    require_java()
    model, run = _tiny_scienceworld_llama(tmp_path / "model"), tmp_path / "run"
    small = [f"model.path={model}", "model.dtype=float32", "model.remat=none", "progress=false", f"run_dir={run}",
             "sft.demos=2", "sft.epochs=1", "sft.batch_size=2", "sft.optim.total_steps=1", "sft.optim.warmup_steps=0",
             "sft.log_every=1", "eto.iterations=1", "eto.explore_tasks=2", "eto.batch_size=2", "eto.epochs=1",
             "env.options.types=[find-animal,find-plant]",  # short gold paths: short rows
             "rollout.max_turns=2", "rollout.max_tokens_per_turn=16", "rollout.max_context=4096",
             "rollout.max_concurrent=2", "rollout.env_workers=2", "eval.tasks=2"]
    done = subprocess.run([sys.executable, "-m", "jaxagent.train", "--config", "eto_scienceworld_llama2_7b", *small],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (trained,) = [r for r in records if r["stage"] == "eto" and r["kind"] == "train"]
    # A random policy scores less than the gold path on both variations: two pairs, the expert chosen in each.
    assert trained["explored"] == 2 and trained["pairs"] == 2 and trained["chosen_is_expert"] == 1.0, trained
    assert abs(trained["dpo_loss_first"] - 0.6931472) < 1e-4 and trained["updates"] == 1
    unseen = [r for r in records if r["stage"] == "eto" and r["kind"] == "eval"][-1]
    assert unseen["episodes"] == 2
    seen = evaluate_run(run, "seen", ["eto"])["eto"]  # `python -m jaxagent.evaluate --run DIR --split seen`
    assert seen["episodes"] == 2 and 0.0 <= seen["reward"] <= 1.0
