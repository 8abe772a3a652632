"""`python -m jaxagent.serve`: an OpenAI-compatible server over the sampler, talked to by ColBench's `openai`
simulator (concurrent episodes batched together; a server killed mid-episode ends episodes as env errors)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import pytest

from jaxagent.envs.base import ENV_ERROR
from jaxagent.envs.colbench import Service
from jaxagent.envs.colbench.simulator import SIMULATOR_PROMPT, OpenAISimulator
from jaxagent.envs.colbench.tasks import offline_split, offline_task
from jaxagent.envs.registry import make_env

from conftest import tiny_pretrained


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random chat model whose tokenizer was trained on ColBench text."""
    tasks = [offline_task(t) for t in offline_split("dev")[:16]]
    texts = [SIMULATOR_PROMPT] + [t.problem_description + t.ground_truth for t in tasks]
    texts += [f.question + " " + f.answer for t in tasks for f in t.facts]
    return tiny_pretrained(tmp_path_factory.mktemp("chat") / "model", texts * 4, vocab_size=1024)


def _start(chat_model):
    proc = subprocess.Popen([sys.executable, "-m", "jaxagent.serve", "--model", str(chat_model), "--port", "0",
                             "--max-len", "2048"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("serving"):
        proc.kill()
        pytest.fail(f"the server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    yield proc, line.split(" on ")[1].strip()
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(chat_model):
    yield from _start(chat_model)


@pytest.fixture()
def server_to_kill(chat_model):
    yield from _start(chat_model)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _health(url: str) -> dict:
    with urllib.request.urlopen(url.replace("/v1", "/health"), timeout=30) as response:
        return json.loads(response.read())


def test_the_server_answers_chat_completions_and_lists_its_model(server, chat_model):
    _, url = server
    with urllib.request.urlopen(f"{url}/models", timeout=30) as response:
        assert json.loads(response.read())["data"][0]["id"] == chat_model.name
    status, reply = _post(url, {"messages": [{"role": "user", "content": "How long must a password be?"}],
                                "temperature": 0, "max_tokens": 6})
    assert status == 200, reply
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length") and 1 <= reply["usage"]["completion_tokens"] <= 6
    status, error = _post(url, {"messages": "hello"})
    assert status == 400 and "'messages' must be a non-empty list" in error["error"]["message"]
    status, error = _post(url, {"messages": [{"role": "user", "content": "x " * 3000}]})
    assert status == 400 and "this server holds at most 2048" in error["error"]["message"]


def test_openai_simulator_plays_concurrent_episodes_through_the_server(server):
    proc, url = server
    service = Service({"simulator": "openai", "simulator_url": url, "simulator_retries": 0})
    tasks = list(offline_split("test")[:8])

    def play(task_id: str):
        env = make_env("colbench", task_id, 0, service)
        env.reset()
        replies = []
        for turn in env.expert_turns():
            result = env.step(turn)
            replies.append(result.observation)
            if result.done:
                return result.reward, replies[:-1]

    before = _health(url)["requests"]
    with ThreadPoolExecutor(8) as pool:
        played = list(pool.map(play, tasks))
    # The expert's answer is right whatever the (random) user said; every question got a reply.
    assert all(reward == 1.0 and len(replies) >= 2 and all(isinstance(r, str) for r in replies)
               for reward, replies in played), played
    health = _health(url)
    assert health["requests"] - before == sum(len(replies) for _, replies in played), health
    assert health["largest_batch"] > 1, health  # questions of concurrent episodes were decoded together


def test_a_server_killed_mid_episode_ends_the_episodes_as_env_errors(server_to_kill, chat_model):
    from transformers import AutoTokenizer

    from jaxagent.models.hf import load_hf_params
    from jaxagent.rollout import RolloutConfig, collect
    from jaxagent.sampling import Sampler
    from jaxagent.tokens import ChatRenderer

    proc, url = server_to_kill

    class KilledAfterItsFirstReply(OpenAISimulator):
        def reply(self, task, dialogue, question):
            answer = super().reply(task, dialogue, question)
            proc.kill()
            return answer

    service = Service({"simulator": "openai", "simulator_url": url, "simulator_retries": 1})
    service.simulator = KilledAfterItsFirstReply(url, retries=1, timeout_s=10)
    config, params = load_hf_params(chat_model)
    tokenizer = AutoTokenizer.from_pretrained(str(chat_model))
    rollout = RolloutConfig(max_turns=4, max_tokens_per_turn=8, max_context=2048, decode_chunk=8, max_concurrent=2,
                            env_workers=2)
    trajectories = collect(Sampler(config, max_len=2048, tokenizer=tokenizer), params, ChatRenderer(tokenizer),
                           lambda task, seed: make_env("colbench", task, seed, service), list(offline_split("dev")[:2]),
                           1, rollout, jax.random.key(0))
    # A random policy only asks; after the first reply the server is gone and each episode's next question fails.
    assert [t.termination for t in trajectories] == [ENV_ERROR, ENV_ERROR], [t.info for t in trajectories]
    assert all("did not answer" in t.info["error"] for t in trajectories)


def _official_backend(folder, tasks):
    """Offline tasks written as the official backend_tasks/{train,test}.jsonl files."""
    folder.mkdir()
    for split in ("train", "test"):
        folder.joinpath(f"{split}.jsonl").write_text("".join(json.dumps(
            {"problem_description": t.problem_description, "ground_truth": t.ground_truth,
             "test_cases": json.dumps(t.test_cases)}) + "\n" for t in tasks))
    return folder


@pytest.mark.slow
def test_the_sweet_colbench_llama8b_config_runs_short_with_a_tiny_model_and_the_served_simulator(
        server, chat_model, tmp_path):
    """The paper config end to end with a tiny model in place of Llama-3.1-8B: official-format data from
    $JAXAGENT_COLBENCH_DATA, the openai simulator at $JAXAGENT_SIMULATOR_URL (our server), collect, critic, sweet."""
    _, url = server
    tasks = [offline_task(t) for t in offline_split("dev")[:4]]
    data = _official_backend(tmp_path / "backend_tasks", tasks)
    answer = "I WANT TO ANSWER:\n```python\n{}\n```"
    offline = tmp_path / "offline.jsonl"  # a success and a failure per task: the critic's pairs
    offline.write_text("".join(json.dumps(
        {"task": {"task_id": f"train/{i}", "training_info": t.ground_truth}, "rollout_index": k,
         "messages": [{"role": "user", "content": t.problem_description},
                      {"role": "assistant", "content": answer.format(code)}], "reward": reward,
         "success": reward == 1.0}) + "\n"
        for i, t in enumerate(tasks) for k, (code, reward) in enumerate([(t.ground_truth, 1.0), ("pass", 0.0)])))
    environment = {**os.environ, "JAXAGENT_MODEL_DIR": str(chat_model), "JAXAGENT_COLBENCH_DATA": str(data),
                   "JAXAGENT_SIMULATOR_URL": url}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxagent.train", "--config", "sweet_colbench_llama8b", f"run_dir={run}",
         "progress=false", "model.dtype=float32", "collect.tasks=2", "collect.rollouts_per_task=2",
         f"critic.data={offline}", "critic.held_out=0.0", "critic.replay=0", "critic.epochs=1",
         f"sweet.data={offline}", "sweet.candidates=2", "sweet.pairs_per_turn=1", "rollout.max_turns=2",
         "rollout.max_tokens_per_turn=16", "rollout.max_context=1024", "rollout.max_concurrent=8",
         "rollout.env_workers=4", "eval.tasks=2"],
        env=environment, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    collected = [json.loads(line) for line in (run / "stages" / "collect" / "trajectories.jsonl").open()]
    assert len(collected) == 4 and {r["task"]["task_id"] for r in collected} <= {f"train/{i}" for i in range(4)}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    critic, sweet = (r for r in records if r["kind"] == "train" and r["stage"] in ("critic", "sweet"))
    assert critic["pairs"] == 4 and sweet["turns"] == 8 and sweet["candidates"] == 16, (critic, sweet)
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stages"]) == ["collect", "critic", "sweet"]
    assert summary["stages"]["sweet"]["eval_episodes"] == 2
