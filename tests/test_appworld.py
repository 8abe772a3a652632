"""AppWorld for real: the `appworld` package in its own virtualenv, served on loopback, driven through jaxagent.

The first test run builds the virtualenv and the offline task set in ./.appworld (ignored by git; about a minute);
later runs reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxagent.data import read_conversations
from jaxagent.envs.appworld import ServerPool, data_root, default_home, ensure_home
from jaxagent.envs.appworld.__main__ import as_agent_turn, check
from jaxagent.envs.appworld.__main__ import main as appworld_main
from jaxagent.envs.appworld.env import AppWorldEnv
from jaxagent.envs.appworld.ground_truth import solution_cells, task_difficulty
from jaxagent.envs.appworld.offline_tasks import TASKS, split_task_ids
from jaxagent.envs.base import ENV_ERROR, EnvError
from jaxagent.envs.registry import list_tasks
from jaxagent.errors import run_main
from jaxagent.metrics import goal_completion

from conftest import FAST_COMPILE_FLAGS, RUNTIME_FLAGS, tiny_pretrained

REPO = Path(__file__).resolve().parents[1]


def runtime_env() -> dict:
    """The environment with XLA tuned for running (2,048-token contexts), not for compiling fast."""
    flags = os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE_FLAGS, RUNTIME_FLAGS)
    return {**os.environ, "XLA_FLAGS": flags}


@pytest.fixture(scope="session")
def home():
    return ensure_home(default_home(os.environ.get("JAXAGENT_APPWORLD_HOME") or REPO / ".appworld"))


@pytest.fixture
def pool(home):
    pool = ServerPool(home, home.offline_root, size=2)
    yield pool
    pool.close()


def test_the_offline_set_is_appworld_data_in_appworld_format(home):
    tasks = home.offline_root / "data" / "tasks"
    assert sorted(p.name for p in tasks.iterdir()) == sorted(t.task_id for t in TASKS)
    assert len({t.scenario for t in TASKS}) >= 3 and len(TASKS) >= 6
    specs = json.loads((tasks / "venmopay_1" / "specs.json").read_text())
    assert specs["instruction"] == TASKS[0].instruction and specs["db_version"] == "0.1.0"
    for name in ("evaluation.py", "test_data.json", "answer.json", "metadata.json"):
        assert (tasks / "venmopay_1" / "ground_truth" / name).is_file()
    assert (tasks / "venmopay_1" / "dbs" / "venmo.db").is_file()
    assert len(list((home.offline_root / "data" / "api_docs" / "standard").glob("*.json"))) >= 10
    # The package itself reads it back: its loader, with the root set as AppWorld expects.
    probe = ("from appworld.task import Task, load_task_ids\n"
             "ids = load_task_ids('train')\ntask = Task.load(ids[0])\n"
             "print(ids, task.instruction, len(task.ground_truth.test_data))")
    out = subprocess.run([str(home.python), "-c", probe], env=home.child_env(home.offline_root),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{split_task_ids('train')} {TASKS[0].instruction} 5"


def test_every_ground_truth_scores_one_and_every_wrong_solution_less(pool):
    records = check(pool, workers=2)
    assert len(records) == 2 * len(TASKS)
    for record in records:
        assert record["completed"], record  # each ends on apis.supervisor.complete_task(...)
        if record["solution"] == "solution":
            assert record["reward"] == 1.0, record
        else:
            assert 0.0 < record["reward"] < 1.0, record
    servers = list(pool._idle)
    assert 1 <= len(servers) <= 2
    pool.close()
    assert all(not server.alive() for server in servers)  # every server shut down


def test_an_episode_without_complete_task_is_scored_by_evaluate_and_no_code_gets_a_hint(pool):
    env = AppWorldEnv("notecount_1", pool)
    try:
        messages = env.reset()
        assert [m["role"] for m in messages] == ["system", "user"]
        assert "Task: How many of my Simple Note notes" in messages[1]["content"]
        assert "avery.lindqvist@gmail.com" in messages[1]["content"] and "2023-05-18" in messages[1]["content"]
        assert env.step("I think the answer is three.").observation.startswith("No code found")
        result = env.step(as_agent_turn("print(1 + 1)"))
        assert (result.observation.strip(), result.done) == ("2", False)
        outcome = env.evaluate()  # the answer test fails, the no-change test passes
        assert outcome.reward == 0.5 and outcome.info["tests_total"] == 2 and not outcome.info["success"]
    finally:
        env.close()


def test_splits_goal_completion_and_bad_options(home, monkeypatch):
    options = {"data": "offline", "home": str(home.path)}
    assert list_tasks("appworld", "train", options) == split_task_ids("train")
    assert list_tasks("appworld", "dev", options) == split_task_ids("dev")
    with pytest.raises(EnvError, match="no split 'test_normal'; it has: dev, train"):
        list_tasks("appworld", "test_normal", options)
    with pytest.raises(EnvError, match="unknown AppWorld option env.options.dtaa"):
        data_root({"dtaa": "offline"})
    monkeypatch.delenv("APPWORLD_ROOT", raising=False)
    with pytest.raises(EnvError, match="needs \\$APPWORLD_ROOT"):
        data_root({"data": "official"})
    with pytest.raises(EnvError, match="is not an AppWorld root"):
        data_root({"data": str(home.path)})
    from jaxagent.trajectory import Trajectory

    def rollout(task, success, k=0):
        ids = np.zeros(2, np.int32)
        return Trajectory(ids, np.array([0, 1], np.int8), np.zeros(2, np.float32), ids, float(success), 0, k, task,
                          {"success": success})
    stats = goal_completion([rollout("a_1", True), rollout("a_2", True), rollout("b_1", True),
                             rollout("b_2", False)], lambda t: t.split("_")[0])
    assert stats == {"tgc": 75.0, "sgc": 50.0}


def _tiny_pretrained(folder: Path) -> Path:
    """A tiny random Qwen2 with a tokenizer trained on AppWorld text, saved as a Hugging Face model folder."""
    from jaxagent.envs.appworld.prompt import EXAMPLE, SYSTEM_PROMPT

    texts = [SYSTEM_PROMPT, EXAMPLE] + [t.instruction for t in TASKS] + [c for t in TASKS for c in t.solution]
    # A vocabulary as large as the corpus allows: AppWorld's prompt in ~800 tokens, not ~1,400, halves every shape.
    return tiny_pretrained(folder, texts, vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def test_compiled_solutions_cut_back_into_the_cells_they_were_written_from():
    for task in TASKS:
        assert solution_cells(task.compiled_solution) == list(task.solution)
    code = "def solution(apis, requester):\n    a = 1\n    for x in [1]:\n\n        a += x\n\n    print(a)\n"
    assert solution_cells(code) == ["a = 1\nfor x in [1]:\n\n    a += x", "print(a)"]  # a blank line inside a loop


def test_the_paper_training_split_by_difficulty_and_sft_data_from_the_ground_truth(home, tmp_path, capsys):
    """`split --max-difficulty 2 --name train_d12` keeps the train tasks of difficulty 1-2 (the metadata says which);
    `sft-gt` plays their solutions and writes the dialogues for sft.data."""
    options = {"data": "offline", "home": str(home.path)}
    for task in TASKS:
        assert task_difficulty(home.offline_root, task.task_id) == task.difficulty
    assert appworld_main(["split", "--home", str(home.path), "--data", "offline", "--max-difficulty", "2",
                          "--name", "train_d12"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = [t.task_id for t in TASKS if t.task_id in split_task_ids("train") and t.difficulty <= 2]
    assert list_tasks("appworld", "train_d12", options) == expected and 0 < len(expected) < 6
    assert report["left_out"] == len(split_task_ids("train")) - len(expected)

    out = tmp_path / "sft_gt.jsonl"
    assert appworld_main(["sft-gt", "--home", str(home.path), "--data", "offline", "--split", "train_d12",
                          "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["conversations"] == len(expected) and report["failed"] == []
    conversations = read_conversations(out)
    by_task = {t.task_id: t for t in TASKS}
    for task_id, messages in zip(expected, conversations):
        turns = [m["content"] for m in messages if m["role"] == "assistant"]
        assert turns == [as_agent_turn(cell) for cell in by_task[task_id].solution]
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"


@pytest.mark.parametrize("argv, message", [
    (["split", "--name", "train"], "'train' is an official AppWorld split"),
    (["split", "--name", "../x"], "AppWorld split name '../x'"),
    (["split", "--from", "nope", "--name", "x"], "has no split 'nope'; it has: dev, train"),
    (["split", "--max-difficulty", "0", "--name", "x"], "no task of split 'train' has difficulty <= 0"),
])
def test_a_bad_split_command_stops_with_one_line(home, capsys, argv, message):
    assert run_main(appworld_main, [*argv, "--home", str(home.path), "--data", "offline"]) == 2
    assert message in capsys.readouterr().err


def test_loop_qwen7b_runs_a_short_loop_stage_on_the_offline_tasks(home, tmp_path):
    model = _tiny_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    overrides = [f"model.path={model}", "model.dtype=float32", "model.param_dtype=float32", "model.remat=none",
                 "env.options.data=offline", f"env.options.home={home.path}", "env.options.servers=2",
                 "env.train_split=train", "env.eval_split=dev",  # the offline set's splits
                 "rollout.max_context=2048", "rollout.max_tokens_per_turn=16", "rollout.max_turns=2",
                 "rollout.max_concurrent=2", "rollout.env_workers=2", "rollout.decode_chunk=16",
                 "loop.iterations=1", "loop.tasks_per_iteration=2", "loop.rollouts_per_task=2",
                 "loop.minibatch_size=4", "loop.micro_batches=1",
                 "loop.min_abs_advantage=0.0",  # a random policy ties every group; keep them so the update runs
                 "eval.tasks=1", "checkpoint.every=1", f"run_dir={run}"]
    result = subprocess.run([sys.executable, "-m", "jaxagent.train", "--config", "loop_qwen7b", *overrides],
                            capture_output=True, text=True, timeout=600, cwd=REPO, env=runtime_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TGC" in result.stdout and "SGC" in result.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [1]
    assert all(r["episodes"] == 4 and r["updates"] >= 1 for r in train)
    evals = [r for r in records if r["kind"] == "eval"]  # the paper's evaluation: greedy, 2 rollouts per task
    assert evals and evals[-1]["episodes"] == 1 * 2 and "tgc" in evals[-1]
    assert (run / "stages" / "loop" / "policy").is_dir() and any((run / "checkpoints" / "loop").iterdir())
    assert json.loads((run / "stages" / "loop" / "result.json").read_text())["episodes"] == 1 * 2


def test_a_server_killed_during_collection_ends_one_episode_and_the_round_goes_on(home, tmp_path):
    """Through the rollout engine: one episode's server dies mid-episode; that episode ends "env_error"."""
    from transformers import AutoTokenizer

    from jaxagent.models.hf import load_hf_params
    from jaxagent.rollout import RolloutConfig, collect
    from jaxagent.sampling import Sampler
    from jaxagent.tokens import ChatRenderer

    folder = _tiny_pretrained(tmp_path / "model")
    model, params = load_hf_params(folder, dtype="float32", param_dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pool = ServerPool(home, home.offline_root, size=2)  # each server is a Python process importing AppWorld
    killed = []

    class KilledMidEpisode(AppWorldEnv):
        def step(self, text):
            if self.seed == 1 and not killed:  # task 0, rollout 1: its server dies after its first turn
                killed.append(self._server.port)
                self._server.process.kill()
                self._server.process.wait(timeout=30)
                text = as_agent_turn("print('still there?')")
            return super().step(text)

    config = RolloutConfig(max_turns=2, max_tokens_per_turn=16, max_context=2048, decode_chunk=16,
                           max_concurrent=2, env_workers=2, env_timeout_s=120)
    try:
        def make_env(task_id, seed):
            return KilledMidEpisode(task_id, pool, seed=seed)
        sampler = Sampler(model, max_len=2048, tokenizer=tokenizer)
        rollouts = collect(sampler, params, ChatRenderer(tokenizer), make_env, ["venmopay_1", "notecount_1"], 2,
                           config, jax.random.key(0))
        reasons = {(t.group_id, t.rollout_index): t.termination for t in rollouts}
        assert reasons[(0, 1)] == ENV_ERROR and "dead" in next(t for t in rollouts if t.rollout_index == 1
                                                               and t.group_id == 0).info["error"]
        assert all(reason != ENV_ERROR for key, reason in reasons.items() if key != (0, 1)), [t.info for t in rollouts]
        assert pool.restarts == 1
        again = collect(sampler, params, ChatRenderer(tokenizer), make_env, ["phonetext_1"], 2, config,
                        jax.random.key(1))
        assert [t.termination for t in again] == ["max_turns", "max_turns"]
    finally:
        pool.close()


def test_servers_exit_when_the_trainer_is_killed(home):
    """A trainer killed with SIGKILL runs no cleanup; its servers notice their parent is gone and exit."""
    script = ("import sys\nfrom pathlib import Path\nfrom jaxagent.envs.appworld import ServerPool, default_home\n"
              f"home = default_home({str(home.path)!r})\npool = ServerPool(home, home.offline_root, size=1)\n"
              "print(pool.acquire().process.pid, flush=True)\nimport time; time.sleep(600)")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(trainer.stdout.readline())
    os.kill(server_pid, 0)  # alive
    trainer.kill()
    trainer.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{server_pid}/stat")
        if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":  # gone, or a zombie not yet reaped
            return
        time.sleep(0.2)
    os.kill(server_pid, 9)
    pytest.fail(f"server {server_pid} outlived the killed trainer")
