"""Human simulators for ColBench: the user who knows the hidden reference and answers the agent's questions.

Every simulator follows ColBench's rules: answer in at most two sentences, from what the hidden reference says, and
say so when it does not say; replies are cut at `MAX_REPLY_CHARS`.

* `scripted`: answers from an offline task's structured facts (the facts whose keywords the question mentions);
  deterministic, needs no model: for the offline set and CI.
* `openai`: a model behind any OpenAI-compatible chat endpoint (`simulator_url`, e.g. a vLLM server as in the paper,
  or `python -m jaxagent.serve`), prompted with the hidden reference and these rules, at temperature 0. Episodes
  call it from the environment workers concurrently; a request that fails or times out is retried
  (`simulator_retries`), then the episode ends as an environment error.
* `local`: a model loaded by jaxagent (`simulator_model`, a Hugging Face or policy folder) and sampled with its
  sampler, the live episodes' questions batched together.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request

from jaxagent.envs.base import EnvError, Message
from jaxagent.envs.colbench.tasks import Task

MAX_REPLY_CHARS = 400
MAX_REPLY_TOKENS = 128
DONT_KNOW = "I don't know; that is up to you."
SIMULATORS = ("scripted", "openai", "local")
URL_VARIABLE = "JAXAGENT_SIMULATOR_URL"
SIMULATOR_PROMPT = (
    "You are a person who asked a programmer to write a Python function. You have this function in mind; the "
    "programmer cannot see it:\n\n{reference}\n\nThe programmer will ask you questions about it. Answer each in at "
    "most two sentences, in plain words, using only what the function above does. If it does not settle the "
    "question, say that you don't know. Never show or dictate code."
)


class SimulatorError(RuntimeError):
    """The simulated user could not answer (its server failed or timed out); the episode ends as env_error."""


def simulator_messages(task: Task, dialogue: list[Message]) -> list[Message]:
    """The conversation from the simulated user's side: its instructions with the hidden reference, its own request,
    then the programmer's turns as the other party's (roles swapped)."""
    messages = [{"role": "system", "content": SIMULATOR_PROMPT.format(reference=task.ground_truth.strip())}]
    swap = {"user": "assistant", "assistant": "user"}
    return messages + [{"role": swap[m["role"]], "content": m["content"]} for m in dialogue if m["role"] in swap]


def cut(reply: str) -> str:
    """A reply as the agent receives it: at most `MAX_REPLY_CHARS` characters."""
    return reply.strip()[:MAX_REPLY_CHARS]


class ScriptedSimulator:
    """Answers from the task's facts: each fact whose keywords occur in the question, at most two of them."""

    def reply(self, task: Task, dialogue: list[Message], question: str) -> str:
        if not task.facts:
            raise EnvError(f"the scripted simulator needs an offline task; {task.task_id!r} is official data: use "
                           "env.options.simulator openai or local")
        text = question.lower()
        answers = [fact.answer for fact in task.facts if any(word in text for word in fact.keywords)]
        return cut(" ".join(answers[:2]) or DONT_KNOW)

    def close(self) -> None:
        pass


class OpenAISimulator:
    """The user as a model behind an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(self, url: str, model: str = "", timeout_s: float = 60.0, retries: int = 2) -> None:
        self.url, self.model, self.timeout_s, self.retries = url.rstrip("/"), model, timeout_s, retries

    def reply(self, task: Task, dialogue: list[Message], question: str) -> str:
        body = {"model": self.model or "default", "messages": simulator_messages(task, dialogue),
                "temperature": 0.0, "max_tokens": MAX_REPLY_TOKENS}
        request = urllib.request.Request(f"{self.url}/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return cut(json.loads(response.read())["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == self.retries:
                    raise SimulatorError(f"simulator at {self.url}: HTTP {err.code} {err.read()[:300]!r}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as err:
                # HTTPException: e.g. IncompleteRead, when the server dies while its reply is on the way
                if attempt == self.retries:
                    raise SimulatorError(f"simulator at {self.url} did not answer after {attempt + 1} tries: "
                                         f"{err}") from None
            time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        pass


class LocalSimulator:
    """The user as a model jaxagent loads and samples itself (greedy), questions of live episodes batched."""

    def __init__(self, folder: str, max_len: int = 8192) -> None:
        from jaxagent.serving import ChatModel

        self.model = ChatModel(folder, max_len=max_len)

    def reply(self, task: Task, dialogue: list[Message], question: str) -> str:
        from jaxagent.serving import ServingError

        try:
            completion = self.model.complete(simulator_messages(task, dialogue), temperature=0.0,
                                             max_tokens=MAX_REPLY_TOKENS)
        except ServingError as err:
            raise SimulatorError(f"local simulator: {err}") from None
        return cut(completion.text)

    def close(self) -> None:
        self.model.close()


def make_simulator(name: str, options: dict):
    """The simulator `env.options.simulator` names."""
    if name == "scripted":
        return ScriptedSimulator()
    if name == "openai":
        url = options.get("simulator_url") or os.environ.get(URL_VARIABLE)
        if not url:
            raise EnvError(f"env.options.simulator=openai needs env.options.simulator_url (or ${URL_VARIABLE}), "
                           "e.g. http://127.0.0.1:8000/v1")
        return OpenAISimulator(url, options.get("simulator_model", ""), float(options.get("simulator_timeout_s", 60)),
                               int(options.get("simulator_retries", 2)))
    if name == "local":
        if not options.get("simulator_model"):
            raise EnvError("env.options.simulator=local needs env.options.simulator_model, a Hugging Face or "
                           "jaxagent policy folder")
        return LocalSimulator(str(options["simulator_model"]))
    raise EnvError(f"env.options.simulator={name!r} is not a ColBench simulator; valid: {', '.join(SIMULATORS)}")
