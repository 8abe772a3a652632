"""`python -m jaxagent.envs.appworld setup | check`: AppWorld's virtualenv, the offline task set, a self-check.

    setup   create the virtualenv (pip install appworld, `appworld install`) and build the offline task set
    check   play every offline task's ground-truth and wrong solution through jaxagent's AppWorld environment and
            print their rewards (ground truth must score 1.0, the wrong ones less)
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from jaxagent.envs.appworld import AppWorldEnv, ServerPool, default_home, ensure_home
from jaxagent.envs.appworld.offline_tasks import TASKS, OfflineTask
from jaxagent.envs.base import Outcome
from jaxagent.errors import run_main


def as_agent_turn(code: str) -> str:
    """A scripted cell written as a model would write its turn."""
    return f"I run the next step.\n```python\n{code}\n```"


def play(pool: ServerPool, task_id: str, turns: Sequence[str]) -> tuple[Outcome, bool]:
    """Play `turns` (cells) as one episode; returns the outcome and whether the environment ended it."""
    env = AppWorldEnv(task_id, pool)
    try:
        env.reset()
        for code in turns:
            result = env.step(as_agent_turn(code))
            if result.done:
                return Outcome(result.reward, result.info), True
        return env.evaluate(), False
    finally:
        env.close()


def check(pool: ServerPool, tasks: Sequence[OfflineTask] = TASKS, workers: int = 2) -> list[dict]:
    """Every task's ground truth and wrong solution, played; one record each."""
    jobs = [(task, kind) for task in tasks for kind in ("solution", "wrong")]

    def run(job):
        task, kind = job
        outcome, ended = play(pool, task.task_id, getattr(task, kind))
        return {"task": task.task_id, "solution": kind, "reward": outcome.reward, "completed": ended,
                "tests": f"{outcome.info['tests_passed']}/{outcome.info['tests_total']}"}

    with ThreadPoolExecutor(workers) as threads:
        return list(threads.map(run, jobs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxagent.envs.appworld", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("setup", "check"))
    parser.add_argument("--home", default=None, help="AppWorld home (default $JAXAGENT_APPWORLD_HOME or ./.appworld)")
    parser.add_argument("--servers", type=int, default=2, help="check: servers run at once")
    args = parser.parse_args(argv)
    home = ensure_home(default_home(args.home))
    if args.command == "setup":
        print(json.dumps({"home": str(home.path), "python": str(home.python), "offline_root": str(home.offline_root),
                          "tasks": len(TASKS)}))
        return 0
    pool = ServerPool(home, home.offline_root, size=args.servers)
    try:
        records = check(pool, workers=args.servers)
    finally:
        pool.close()
    for record in records:
        print(json.dumps(record))
    good = all(r["reward"] == 1.0 for r in records if r["solution"] == "solution")
    bad = all(r["reward"] < 1.0 for r in records if r["solution"] == "wrong")
    return 0 if good and bad else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
