"""The ColBench backend environment: the agent asks a simulated user about a vague request, then writes a function.

An episode starts with the request. Each agent turn is either a question, which the human simulator answers, or
the answer: `I WANT TO ANSWER:` followed by the code (its first fenced block, else the text after the marker). The
episode ends at the answer or after `MAX_AGENT_TURNS` turns (then the reward is 0). The reward is the fraction of
the task's test calls on which the answer's output equals the hidden reference's; success means all of them. The
reference (training-time information, `training_info()`) is for the trainer's critic and never enters the agent's
prompt.
"""

from __future__ import annotations

import random
import re

from jaxagent.envs.base import Message, Outcome, StepResult
from jaxagent.envs.colbench.scoring import ReferenceOutputs, score
from jaxagent.envs.colbench.tasks import ANSWER_MARKER, Task, expert_turns

MAX_AGENT_TURNS = 10
SYSTEM_PROMPT = (
    "You are a programmer helping a user who wants a Python function. Their request is vague: ask them short "
    "questions, one at a time, about whatever the function's exact behaviour depends on. When you know enough, "
    f"write '{ANSWER_MARKER}' followed by the complete function in a ```python block. You have at most "
    f"{MAX_AGENT_TURNS} turns, the answer included."
)
_FENCED = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)


def extract_answer(text: str) -> str | None:
    """The code of an answer turn (None when the turn is a question)."""
    if ANSWER_MARKER not in text:
        return None
    after = text.split(ANSWER_MARKER, 1)[1]
    block = _FENCED.search(after)
    return (block.group(1) if block else after).strip("\n")


class ColBenchEnv:
    """One ColBench backend episode."""

    def __init__(self, task: Task, simulator, references: ReferenceOutputs, seed: int = 0,
                 isolation: str = "namespaces") -> None:
        self.task, self.task_id, self.seed = task, task.task_id, seed
        self.simulator, self.references, self.isolation = simulator, references, isolation
        self._dialogue: list[Message] = []
        self._turns = 0
        self._outcome: Outcome | None = None

    def reset(self) -> list[Message]:
        """The system prompt and the user's request."""
        self._dialogue = [{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": self.task.problem_description}]
        self._turns, self._outcome = 0, None
        return list(self._dialogue)

    def parse_action(self, text: str) -> str | None:
        """The answer's code, or None for a question."""
        return extract_answer(text)

    def step(self, text: str) -> StepResult:
        """A question gets the simulator's reply; an answer is scored and ends the episode."""
        self._turns += 1
        self._dialogue.append({"role": "assistant", "content": text})
        code = self.parse_action(text)
        if code is not None:
            self._outcome = self._score(code)
            return StepResult("", done=True, reward=self._outcome.reward, info=self._outcome.info)
        if self._turns >= MAX_AGENT_TURNS:
            outcome = self.evaluate()
            return StepResult("", done=True, reward=outcome.reward, info=outcome.info)
        reply = self.simulator.reply(self.task, self._dialogue, text)
        self._dialogue.append({"role": "user", "content": reply})
        return StepResult(reply)

    def evaluate(self) -> Outcome:
        """The answer's score; without an answer, reward 0."""
        if self._outcome is not None:
            return self._outcome
        total = len(self.task.test_cases)
        return Outcome(0.0, {"success": False, "answered": False, "tests_passed": 0, "tests_total": total})

    def training_info(self) -> str:
        """What the critic may read and the agent never sees: the hidden reference solution."""
        return self.task.ground_truth

    def expert_turns(self, mistake_rate: float = 0.0, rng: random.Random | None = None) -> list[str]:
        """The scripted expert's turns (offline tasks)."""
        return expert_turns(self.task, mistake_rate, rng)

    def close(self) -> None:
        pass

    def _score(self, code: str) -> Outcome:
        calls = list(self.task.test_cases.values())
        reference = self.references.get(self.task_id, self.task.ground_truth, calls)
        result = score(code, reference, calls, self.isolation)
        return Outcome(result.reward, {"success": result.counted > 0 and result.passed == result.counted,
                                       "answered": True, "tests_passed": result.passed,
                                       "tests_total": result.counted})
