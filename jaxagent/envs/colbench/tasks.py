"""ColBench backend tasks: the offline set generated from `families`, and the official JSONL files.

A task is what ColBench's backend programming records hold: a vague `problem_description`, the hidden reference
function (`ground_truth`, source text) and `test_cases` (call expressions). Offline tasks also carry their hidden
`facts`, from which the scripted human simulator answers and the scripted expert asks.

Offline task ids are "<family>/<combination>/<variant>": the combination indexes the family's grid of hidden
details, the variant the wording (function name and request). Splits hold out whole combinations (about 80 / 5 / 15 %
by a hash), so a test task's details never occurred in training; train lists every wording of its combinations, dev
and test three each; each split shuffles every family's tasks (seeded) and takes the families in turn. Official task
ids are "<split>/<line>" of `<data>/train.jsonl` or `test.jsonl`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import zlib
from functools import lru_cache
from pathlib import Path

from jaxagent.envs.base import EnvError
from jaxagent.envs.colbench.families import FAMILIES, Fact, Family

OFFLINE_SPLITS = ("train", "dev", "test")
OFFICIAL_SPLITS = ("train", "test")
ANSWER_MARKER = "I WANT TO ANSWER:"
MISTAKES = ("answer_at_once", "vague_question", "guess_detail")
VAGUE_QUESTION = "Could you tell me a bit more about what you need?"


@dataclasses.dataclass(frozen=True)
class Task:
    """One backend task, in the official schema plus (offline only) the facts behind it."""

    task_id: str
    problem_description: str
    ground_truth: str
    test_cases: dict[str, str]
    facts: tuple[Fact, ...] = ()
    family: str = ""
    params: dict = dataclasses.field(default_factory=dict)
    function_name: str = ""


def _combinations(family: Family) -> list[dict]:
    return [dict(zip(family.grid, values)) for values in itertools.product(*family.grid.values())]


def _split_of(family: str, params: dict) -> str:
    """Where a combination of hidden details belongs: a stable hash, 15 % test, 5 % dev, the rest train."""
    bucket = zlib.crc32(json.dumps([family, params], sort_keys=True).encode()) % 20
    return "test" if bucket < 3 else "dev" if bucket == 3 else "train"


@lru_cache(maxsize=None)
def offline_split(split: str) -> tuple[str, ...]:
    """Every offline task id of a split (train: every wording; dev and test: three wordings, seeded), the families
    taken in turn so that the first N tasks (`eval.tasks`, `sft.demos`) cover every family."""
    if split not in OFFLINE_SPLITS:
        raise EnvError(f"unknown ColBench split {split!r}; valid: {', '.join(OFFLINE_SPLITS)}")
    per_family = []
    for family in FAMILIES.values():
        variants = len(family.function_names) * len(family.requests)
        ids = []
        for index, params in enumerate(_combinations(family)):
            if _split_of(family.name, params) != split:
                continue
            chosen = range(variants) if split == "train" else \
                sorted(random.Random(f"{family.name}/{index}").sample(range(variants), 3))
            ids += [f"{family.name}/{index}/{variant}" for variant in chosen]
        per_family.append(random.Random(family.name).sample(ids, len(ids)))
    return tuple(task for turn in itertools.zip_longest(*per_family) for task in turn if task is not None)


def offline_task(task_id: str) -> Task:
    """The offline task `task_id` (deterministic)."""
    try:
        name, index, variant = task_id.split("/")
        family = FAMILIES[name]
        params = _combinations(family)[int(index)]
        fn = family.function_names[int(variant) % len(family.function_names)]
        request = family.requests[int(variant) // len(family.function_names)]
    except (ValueError, KeyError, IndexError):
        raise EnvError(f"unknown ColBench task {task_id!r}; expected '<family>/<combination>/<variant>' with family "
                       f"one of {', '.join(FAMILIES)}") from None
    description = f"{request} The function should be `def {fn}({family.args})`."
    calls = {f"test_{i}": f"{fn}{arguments}" for i, arguments in enumerate(family.arguments(params))}
    return Task(task_id, description, family.code(fn, params), calls, tuple(family.facts(params)), name, params, fn)


def read_official(data: str | Path, split: str) -> list[Task]:
    """The tasks of an official ColBench backend file, `<data>/<split>.jsonl` (the HF dataset's `backend_tasks/`)."""
    if split not in OFFICIAL_SPLITS:
        raise EnvError(f"unknown ColBench split {split!r} for official data; valid: {', '.join(OFFICIAL_SPLITS)}")
    path = Path(data) / f"{split}.jsonl"
    if not path.is_file():
        raise EnvError(f"env.options.data={str(data)!r}: no {path.name} there; give the folder holding ColBench's "
                       "backend_tasks/train.jsonl and test.jsonl, or 'offline'")
    tasks = []
    for number, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            calls = record["test_cases"]
            if isinstance(calls, str):
                calls = json.loads(calls)
            task = Task(f"{split}/{number}", str(record["problem_description"]), str(record["ground_truth"]),
                        {str(k): str(v) for k, v in dict(calls).items()})
        except (ValueError, KeyError, TypeError):
            raise EnvError(f"{path}:{number + 1}: expected a JSON object with problem_description, ground_truth and "
                           "test_cases (a dict of call expressions)") from None
        tasks.append(task)
    return tasks


def expert_turns(task: Task, mistake_rate: float = 0.0, rng: random.Random | None = None) -> list[str]:
    """The scripted expert's turns: one question per hidden fact, then the answer with the reference code.

    Each mistake kind happens with probability `mistake_rate`: answer at once without asking (writing what an agent
    would assume), open with a vague question the user cannot answer, or skip one question and guess its detail.
    """
    if not task.facts:
        raise EnvError(f"ColBench task {task.task_id!r} has no scripted expert (official tasks carry no facts)")
    rng = rng or random.Random(0)
    mistakes = {kind for kind in MISTAKES if rng.random() < mistake_rate}
    family = FAMILIES[task.family]
    if "answer_at_once" in mistakes:
        return [answer_turn(family.code(task.function_name, {**task.params, **family.defaults}))]
    facts, params = list(task.facts), dict(task.params)
    if "guess_detail" in mistakes:
        guessed = facts.pop(rng.randrange(len(facts)))
        for name in guessed.params:
            params[name] = rng.choice([v for v in family.grid[name] if v != task.params[name]])
    turns = [VAGUE_QUESTION] if "vague_question" in mistakes else []
    turns += [fact.question for fact in facts]
    return turns + [answer_turn(family.code(task.function_name, params))]


def answer_turn(code: str) -> str:
    """The final turn: the marker, then the code in a fenced block."""
    return f"{ANSWER_MARKER}\n```python\n{code.rstrip()}\n```"
