"""The AppWorld environment: an episode is one task world on a served AppWorld environment server.

`reset` takes a server from the pool and calls `/initialize`; each agent turn's ```python blocks run as one cell
through `/execute`; after each cell `/task_completed` says whether the agent called
`apis.supervisor.complete_task(...)`, and then `/evaluate` runs the task's tests: reward = passed / total, success
when all pass (AppWorld's own TestTracker). `close` calls `/close` and gives the server back.

A server failure (it died, refused, timed out) raises, so the rollout engine ends the episode with reason
"env_error"; the pool replaces the server.
"""

from __future__ import annotations

from jaxagent.envs.appworld.prompt import SYSTEM_PROMPT, task_message
from jaxagent.envs.appworld.server import Server, ServerError, ServerPool
from jaxagent.envs.base import Message, Outcome, PythonCellTurns


def scenario_of(task_id: str) -> str:
    """AppWorld's scenario of a task: task ids are `<scenario>_<number>`."""
    return task_id.split("_")[0]


class AppWorldEnv(PythonCellTurns):
    """One AppWorld episode on a server of `pool`."""

    def __init__(self, task_id: str, pool: ServerPool, seed: int = 0, experiment: str = "jaxagent",
                 request_timeout_s: float = 150.0, cell_timeout_s: int = 100) -> None:
        self.task_id, self.pool, self.seed = task_id, pool, seed
        self.experiment, self.request_timeout_s, self.cell_timeout_s = experiment, request_timeout_s, cell_timeout_s
        self._server: Server | None = None

    def reset(self) -> list[Message]:
        """Open the task's world; returns the system prompt and the first user message."""
        self.close()
        self._server = self.pool.acquire()
        task = self._call("/initialize", task_id=self.task_id, timeout_seconds=self.cell_timeout_s,
                          experiment_name=f"{self.experiment}/server-{self._server.port}")
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": task_message(task["instruction"], task["supervisor"],
                                                         str(task["datetime"]).replace("T", " "))}]

    def run_cell(self, code: str) -> str:
        """Run the turn's code on the task's server; returns its output."""
        return str(self._call("/execute", task_id=self.task_id, code=code))

    def completed(self) -> Outcome | None:
        """The evaluation once the agent marked the task complete."""
        return self.evaluate() if self._call("/task_completed", task_id=self.task_id) else None

    def evaluate(self) -> Outcome:
        """Run the task's tests on the current state: reward = fraction passed."""
        report = self._call("/evaluate", task_id=self.task_id, suppress_errors=True)
        passed, total = len(report["passes"]), int(report["num_tests"])
        info = {"tests_passed": passed, "tests_total": total, "success": bool(report["success"]),
                "scenario": scenario_of(self.task_id), "difficulty": report.get("difficulty"),
                "failed": [failure["requirement"] for failure in report["failures"]]}
        return Outcome(passed / total if total else 0.0, info)

    def close(self) -> None:
        """Close the world and give the server back to the pool."""
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.call("/close", timeout=self.request_timeout_s, task_id=self.task_id)
        except ServerError:
            self.pool.release(server, broken=True)
            return
        self.pool.release(server)

    def _call(self, path: str, **body) -> object:
        if self._server is None:
            raise RuntimeError("call reset() before step()")
        try:
            return self._server.call(path, timeout=self.request_timeout_s, **body)
        except ServerError:
            server, self._server = self._server, None
            self.pool.release(server, broken=True)
            raise
