"""ColBench's backend programming tasks (SWEET-RL, arXiv 2503.15478): collaborate with a simulated user on a vague
request, then write the function; reward = the fraction of hidden test calls the answer gets right.

`env.options`:
* `data`: `offline` (default: the generated task families, train / dev / test), the folder holding the official
  `train.jsonl` and `test.jsonl` (HF dataset facebook/collaborative_agent_bench, `backend_tasks/`), or `official`:
  that folder from $JAXAGENT_COLBENCH_DATA;
* `simulator`: `scripted` (default; offline tasks only), `openai` (a chat endpoint at `simulator_url`, or
  $JAXAGENT_SIMULATOR_URL; `simulator_model`, `simulator_timeout_s`, `simulator_retries`) or `local` (the model
  folder `simulator_model`, loaded and sampled by jaxagent); see `simulator`;
* `isolation`: the sandbox's isolation for running answers (`namespaces`, or `python` where the kernel refuses them).
"""

from __future__ import annotations

import os
import threading

from jaxagent.envs.base import EnvError, EnvSpec
from jaxagent.envs.colbench.env import ColBenchEnv
from jaxagent.envs.colbench.scoring import ReferenceOutputs
from jaxagent.envs.colbench.simulator import make_simulator
from jaxagent.envs.colbench.tasks import OFFLINE_SPLITS, Task, offline_split, offline_task, read_official
from jaxagent.envs.sandbox import Sandbox, SandboxError

DATA_ENV = "JAXAGENT_COLBENCH_DATA"
OPTIONS = ("data", "simulator", "simulator_url", "simulator_model", "simulator_timeout_s", "simulator_retries",
           "isolation", "service")


def _check(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise EnvError(f"unknown ColBench option(s) {', '.join(unknown)} in env.options; valid: "
                       f"{', '.join(OPTIONS[:-1])}")
    options = {"data": "offline", "simulator": "scripted", "isolation": "namespaces", **options}
    if options["data"] == "official":  # the official files' folder, named by the environment
        if not os.environ.get(DATA_ENV):
            raise EnvError(f"env.options.data=official needs ${DATA_ENV}: the folder holding ColBench's "
                           "backend_tasks/train.jsonl and test.jsonl (HF dataset facebook/collaborative_agent_bench)")
        options["data"] = os.environ[DATA_ENV]
    return options


class Service:
    """What a run's episodes share: the simulator, the reference outputs, the official tasks by id."""

    def __init__(self, options: dict) -> None:
        self.options = _check(options)
        self.simulator = make_simulator(self.options["simulator"], self.options)
        self.references = ReferenceOutputs(self.options["isolation"])
        self._official: dict[str, Task] = {}
        self._lock = threading.Lock()

    def task(self, task_id: str) -> Task:
        if self.options["data"] == "offline":
            return offline_task(task_id)
        with self._lock:
            if not self._official:
                for split in ("train", "test"):
                    self._official.update({t.task_id: t for t in read_official(self.options["data"], split)})
        if task_id not in self._official:
            raise EnvError(f"unknown ColBench task {task_id!r}; official ids are '<train|test>/<line>'")
        return self._official[task_id]

    def close(self) -> None:
        self.simulator.close()


def start(options: dict, concurrency: int) -> Service:
    """Before a run collects anything: the sandbox can be walled in as asked; the shared service."""
    options = _check(options)
    try:
        Sandbox(isolation=options["isolation"]).close()
    except SandboxError as err:
        raise EnvError(f"colbench: {err}") from None
    return Service(options)


def make(task_id: str, seed: int = 0, service: Service | None = None, **options) -> ColBenchEnv:
    """One episode of `task_id` (a run passes its shared `service`; alone, one is made from `options`)."""
    service = service or Service(options)
    return ColBenchEnv(service.task(task_id), service.simulator, service.references, seed,
                       service.options["isolation"])


def list_tasks(split: str, options: dict) -> list[str]:
    options = _check(options)
    if options["data"] == "offline":
        return list(offline_split(split))
    return [task.task_id for task in read_official(options["data"], split)]


SPEC = EnvSpec(name="colbench", make=make, tasks=list_tasks, splits=OFFLINE_SPLITS, start=start)

__all__ = ["ColBenchEnv", "SPEC"]
