"""The AppTown environment: an episode is a sandboxed interpreter whose harness holds the task's world.

Each agent turn's ```python blocks run as one cell; the observation is what the cell printed (or its traceback).
The episode ends when the agent calls `apis.supervisor.complete_task(...)`; the reward is the fraction of the task's
unit tests that pass on the final state and answer.
"""

from __future__ import annotations

import random

from jaxagent.envs.apptown.tasks import expert_turns, make_task, score
from jaxagent.envs.base import Message, Outcome, PythonCellTurns
from jaxagent.envs.sandbox import HostSpec, Sandbox, SandboxLimits

SYSTEM_PROMPT = (
    "You are an agent in AppTown. Write Python in a ```python block; it runs in a persistent interpreter and you "
    "see what it prints. Use the apps through `apis`: apis.api_docs.show_api_descriptions(app_name=...) lists an "
    "app's APIs. Finish with apis.supervisor.complete_task(), passing answer=... if the task asks a question."
)


class AppTownEnv(PythonCellTurns):
    """One AppTown episode."""

    def __init__(self, task_id: str, seed: int = 0, limits: SandboxLimits = SandboxLimits(cell_timeout_s=5.0,
                                                                                          memory_mb=512),
                 isolation: str = "namespaces") -> None:
        """`isolation`: "namespaces", or "python" where the kernel refuses them (env.options.isolation)."""
        self.task_id, self.seed, self.limits, self.isolation = task_id, seed, limits, isolation
        self.task = make_task(task_id)
        self._sandbox: Sandbox | None = None

    def reset(self) -> list[Message]:
        """Start a fresh interpreter with the task's world; returns the system prompt and the task."""
        self.close()
        world = HostSpec("jaxagent.envs.apptown.world:World", (self.task.state,), name="apis")
        self._sandbox = Sandbox(self.limits, host=world, isolation=self.isolation)
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.task.instruction}]

    def run_cell(self, code: str) -> str:
        """Run the turn's code in the episode's interpreter; returns what it printed."""
        return self._box().run(code).text or "(no output)"

    def completed(self) -> Outcome | None:
        """The score once the agent called `apis.supervisor.complete_task(...)`."""
        final = self._state()
        return Outcome(*score(self.task, final)) if final.get("completed") else None

    def expert_turns(self, mistake_rate: float = 0.0, rng: random.Random | None = None) -> list[str]:
        """The scripted expert's turns for this task (with mistakes of each kind at `mistake_rate`)."""
        return expert_turns(self.task, mistake_rate, rng)

    def evaluate(self) -> Outcome:
        """Score the current state (the task is not complete, so at least that test fails)."""
        return Outcome(*score(self.task, self._state()))

    def close(self) -> None:
        """Stop the interpreter."""
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    def _box(self) -> Sandbox:
        if self._sandbox is None:
            raise RuntimeError("call reset() before step()")
        return self._sandbox

    def _state(self) -> dict:
        return self._box().report()
