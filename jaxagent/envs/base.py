"""The environment protocol and the registry that creates environments by name.

An environment is one episode of one task. `reset` gives the first chat messages; `step` takes the agent's whole
turn text (each environment declares in `parse_action` how text becomes an action, e.g. the Python blocks of a
turn) and returns the next observation or the end; `evaluate` scores the final state when the harness ends the
episode early (turn limit, context overflow). Rewards lie in [0, 1]. Environments run on the host, in worker
threads, while the device decodes; they must not touch JAX.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Protocol, Sequence

Message = dict[str, str]

# Why an episode ended.
COMPLETED = "completed"  # the environment said the task is over (success or not)
MAX_TURNS = "max_turns"
CONTEXT_OVERFLOW = "context_overflow"
ENV_ERROR = "env_error"  # the environment raised or timed out; reward 0
TERMINATIONS = (COMPLETED, MAX_TURNS, CONTEXT_OVERFLOW, ENV_ERROR)


NO_CODE = "No code found. Write Python inside a ```python block."
_PYTHON_BLOCK = re.compile(r"```python\n(.*?)(?:```|$)", re.S)


def python_cell(text: str) -> str | None:
    """The Python of every ```python block of an agent turn, joined into one cell (None if there is none)."""
    blocks = [block.strip("\n") for block in _PYTHON_BLOCK.findall(text)]
    code = "\n".join(block for block in blocks if block.strip())
    return code or None


class EnvError(ValueError):
    """Bad input to an environment (unknown name, split or task id); the message says what is valid."""


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one agent turn led to: the next observation text, or the end with a reward and info."""

    observation: str
    done: bool = False
    reward: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)  # tests_passed, tests_total, success, ...


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How an episode ended: reward in [0, 1] and info (tests passed/total, success)."""

    reward: float
    info: dict


class Environment(Protocol):
    """One episode of one task."""

    task_id: str

    def reset(self) -> list[Message]:
        """Start the episode; returns the first messages (system and user)."""

    def parse_action(self, text: str) -> Any:
        """The action the agent's turn text stands for (None when the text holds no action)."""

    def step(self, text: str) -> StepResult:
        """Apply the agent's turn."""

    def evaluate(self) -> Outcome:
        """Score the current state (used when the harness ends the episode)."""

    def close(self) -> None:
        """Release processes and files."""


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """How to list and create the tasks of one environment."""

    name: str
    make: Callable[..., Environment]  # make(task_id, seed=..., service=..., **options)
    tasks: Callable[[str, dict], Sequence[str]]  # tasks(split, options)
    splits: tuple[str, ...] = ("train", "dev", "test")
    # Processes a run shares between its episodes (AppWorld's server pool): start(options, concurrency) returns an
    # object with close(); every make() of the run receives it as `service`.
    start: Callable[[dict, int], Any] | None = None
    scenario: Callable[[str], str] | None = None  # task id -> scenario, for scenario goal completion (AppWorld)


def registry() -> dict[str, EnvSpec]:
    """Every environment jaxagent ships, by name (imported lazily: ScienceWorld needs Java, AppWorld a server)."""
    from jaxagent.envs.apptown import SPEC as APPTOWN
    from jaxagent.envs.appworld import SPEC as APPWORLD
    from jaxagent.envs.scienceworld import SPEC as SCIENCEWORLD

    return {spec.name: spec for spec in (APPTOWN, APPWORLD, SCIENCEWORLD)}


def get_spec(name: str) -> EnvSpec:
    """The environment called `name`."""
    specs = registry()
    if name not in specs:
        raise EnvError(f"unknown environment {name!r}; valid: {', '.join(sorted(specs))}")
    return specs[name]


def list_tasks(name: str, split: str, options: dict | None = None) -> list[str]:
    """Task ids of one split of an environment (`options`: the run's env.options, e.g. AppWorld's data root)."""
    spec = get_spec(name)
    if split not in spec.splits:
        raise EnvError(f"environment {name!r} has no split {split!r}; valid: {', '.join(spec.splits)}")
    return list(spec.tasks(split, dict(options or {})))


def start_service(name: str, options: dict | None = None, concurrency: int = 1) -> Any:
    """The shared processes of a run of environment `name` (None when it needs none); close() it at the end."""
    spec = get_spec(name)
    return spec.start(dict(options or {}), concurrency) if spec.start is not None else None


def make_env(name: str, task_id: str, seed: int = 0, service: Any = None, **options: Any) -> Environment:
    """An environment for one episode of `task_id` (`service`: what start_service returned, if anything)."""
    spec = get_spec(name)
    if service is not None:
        options["service"] = service
    return spec.make(task_id, seed=seed, **options)
