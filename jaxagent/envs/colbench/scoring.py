"""Score an answer as ColBench does: run the agent's function and the reference on every test call, each call with a
1 s limit, and count the calls whose outputs are equal (calls whose reference output is None do not count).

Both run in the project's sandbox, never in the trainer: the agent's code in an interpreter of its own, the
reference in another, so agent code can neither see nor change the reference. Each call's result crosses back as
its `repr`; the trainer compares the two sides' values (parsed with `ast.literal_eval` when they are literals, else
their text), so printing or a crafted object inside the sandbox cannot make a call pass.
"""

from __future__ import annotations

import ast
import dataclasses
import threading
from typing import Sequence

from jaxagent.envs.sandbox import Sandbox, SandboxLimits

CALL_LIMITS = SandboxLimits(cell_timeout_s=1.0, memory_mb=512, max_processes=8, max_output_chars=4000)
DEFINE_TIMEOUT_S = 10.0  # defining the function (its imports) may take longer than one call
_RESULT = "__colbench_result__"


@dataclasses.dataclass(frozen=True)
class Score:
    """How an answer did: reward = passed / counted."""

    passed: int
    counted: int
    outputs: tuple[str | None, ...]

    @property
    def reward(self) -> float:
        return self.passed / self.counted if self.counted else 0.0


def run_calls(code: str, calls: Sequence[str], isolation: str = "namespaces") -> list[str | None]:
    """The `repr` of each call's result after running `code` (None where the call failed or timed out)."""
    with Sandbox(dataclasses.replace(CALL_LIMITS, cell_timeout_s=DEFINE_TIMEOUT_S), isolation=isolation) as box:
        if box.run(code).error is not None:
            return [None] * len(calls)
        box.limits = CALL_LIMITS
        outputs: list[str | None] = []
        for call in calls:
            # The result is printed last, on a line of its own: whatever the function printed comes before it.
            result = box.run(f"{_RESULT} = repr({call})\nprint('\\n' + {_RESULT})")
            outputs.append(result.output.rstrip("\n").rsplit("\n", 1)[-1] if result.error is None else None)
            if result.restarted:  # a timeout or a crash replaced the interpreter: define the function again
                box.limits = dataclasses.replace(CALL_LIMITS, cell_timeout_s=DEFINE_TIMEOUT_S)
                if box.run(code).error is not None:
                    return outputs + [None] * (len(calls) - len(outputs))
                box.limits = CALL_LIMITS
        return outputs


def same_value(answer: str | None, reference: str) -> bool:
    """Whether two results' reprs stand for equal values (literals compared as values, e.g. 12 == 12.0)."""
    if answer is None:
        return False
    try:
        return ast.literal_eval(answer) == ast.literal_eval(reference)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return answer == reference


class ReferenceOutputs:
    """The reference's outputs per task, computed once (in a sandbox) and shared by every episode of the task."""

    def __init__(self, isolation: str = "namespaces") -> None:
        self.isolation = isolation
        self._cache: dict[str, list[str | None]] = {}
        self._lock = threading.Lock()

    def get(self, task_id: str, ground_truth: str, calls: Sequence[str]) -> list[str | None]:
        with self._lock:
            if task_id in self._cache:
                return self._cache[task_id]
        outputs = run_calls(ground_truth, calls, self.isolation)
        with self._lock:
            return self._cache.setdefault(task_id, outputs)


def score(code: str, ground_truth_outputs: Sequence[str | None], calls: Sequence[str],
          isolation: str = "namespaces") -> Score:
    """Run the answer on every call and compare with the reference's outputs."""
    answers = run_calls(code, calls, isolation)
    counted = [(a, r) for a, r in zip(answers, ground_truth_outputs) if r is not None and r != "None"]
    return Score(sum(same_value(a, r) for a, r in counted), len(counted), tuple(answers))
