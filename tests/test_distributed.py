"""Two processes joined by `jax.distributed` on 127.0.0.1, 4 simulated CPU devices each, train one run together
(SFT then PPO on a data=2, fsdp=2, tensor=2 mesh); killed with SIGKILL mid-RL, they resume to the parameters of an
uninterrupted two-process run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxagent import distributed
from jaxagent.metrics import TIMING_KEYS

from conftest import micro_train_command

# One SFT epoch, one-turn episodes and one evaluation (after the last PPO iteration): all the coordination, less
# waiting on 2 cores (every decode step of an 8-device mesh over two processes is a round of loopback collectives).
RUN = ["stages=[sft,ppo]", "loop.micro_batches=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sft.epochs=1",
       "eval.every=2", "rollout.max_turns=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path) -> list[subprocess.Popen]:
    """Both processes of one job, writing to `run_dir`."""
    port = free_port()
    procs = []
    for index in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXAGENT_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAXAGENT_NUM_PROCESSES": "2", "JAXAGENT_PROCESS_ID": str(index), "JAXAGENT_LOCAL_DEVICES": "4"}
        log = open(f"{run_dir}.p{index}.log", "a")
        procs.append(subprocess.Popen(micro_train_command(run_dir, *RUN), env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen], run_dir: Path) -> None:
    for index, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert code == 0, Path(f"{run_dir}.p{index}.log").read_text()[-3000:]


def records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def policy_leaves(folder: Path) -> list[np.ndarray]:
    from jaxagent.checkpoint import load_policy

    policy = load_policy(folder)
    return [np.asarray(x) for x in jax.tree.leaves(policy.params)]


@pytest.mark.slow
def test_two_processes_train_one_run_and_resume_after_sigkill(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted, victims = launch(full), launch(killed)
    first_rl_checkpoint = killed / "checkpoints" / "ppo" / "1"
    deadline = time.time() + 600
    while not first_rl_checkpoint.is_dir():  # orbax renames a checkpoint into place once complete
        assert time.time() < deadline and all(p.poll() is None for p in victims), "no PPO checkpoint appeared"
        time.sleep(0.05)
    for proc in victims:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "stages" / "ppo" / "result.json").exists()  # killed mid-stage
    finish(launch(killed), killed)
    finish(uninterrupted, full)

    # One run folder written once: one record per (stage, iteration, kind), as the uninterrupted run wrote them.
    assert records(killed) == records(full)
    keys = [(r["stage"], r["iteration"], r["kind"]) for r in records(full)]
    assert len(keys) == len(set(keys)) and ("ppo", 2, "eval") in keys and ("ppo", 1, "eval") not in keys
    ppo = [r for r in records(full) if r["stage"] == "ppo" and r["kind"] == "train"]
    assert all(r["episodes"] == 4 for r in ppo) and sum(r["updates"] for r in ppo) > 0  # 2 tasks x 2, both hosts
    summary = json.loads((full / "summary.json").read_text())
    assert summary["stages"] == json.loads((killed / "summary.json").read_text())["stages"]
    for stage in ("sft", "ppo"):
        a, b = policy_leaves(full / "stages" / stage / "policy"), policy_leaves(killed / "stages" / stage / "policy")
        assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) == 0.0, stage
    assert not [p.name for p in full.iterdir() if "partial" in p.name]


def test_one_process_needs_no_coordination():
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.share_of(5) == [0, 1, 2, 3, 4]
    assert distributed.first_says(True) is True
    distributed.agree([1, 2], "a list")


def test_a_coordinator_without_process_settings_is_refused(monkeypatch):
    monkeypatch.setenv("JAXAGENT_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAXAGENT_NUM_PROCESSES", raising=False)
    with pytest.raises(distributed.DistributedError, match="needs JAXAGENT_NUM_PROCESSES"):
        distributed.initialize()
    monkeypatch.setenv("JAXAGENT_NUM_PROCESSES", "two")
    monkeypatch.setenv("JAXAGENT_PROCESS_ID", "0")
    with pytest.raises(distributed.DistributedError, match="JAXAGENT_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()
