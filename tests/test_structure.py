"""The package's shape: no import circles, environments free of the trainer, configuration free of JAX, every
registry agreeing with the names configurations are validated against, and short functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from jaxagent import advantages, choices, losses, objectives
from jaxagent.algorithms import STAGE_RUNNERS
from jaxagent.algorithms.loop import ALGORITHMS, KEEP_FILTERS
from jaxagent.update import SCHEDULES

PACKAGE = Path(__file__).resolve().parent.parent / "jaxagent"
TRAINER = ("jaxagent.train", "jaxagent.algorithms", "jaxagent.update")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The jaxagent modules `path` imports anywhere in its body (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports a.b, and a.b.c when c is a module.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: imports_of(path, set(files)) - {name} for name, path in files.items()}
    for name in files:  # importing a.b.c runs a/__init__ and a/b/__init__ first (unless the importer is inside them)
        parents = [".".join(name.split(".")[:i]) for i in range(2, name.count(".") + 1)]
        for importer, edges in graph.items():
            if name in edges:
                edges.update(p for p in parents if p in files and p != importer and not importer.startswith(p + "."))
    return graph


def cycle_through(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_package_has_no_import_circle():
    assert cycle_through(import_graph()) is None, " -> ".join(cycle_through(import_graph()))


def test_a_circle_is_found_when_there_is_one():
    assert cycle_through({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_through({"a": {"b"}, "b": set()}) is None


def test_environments_never_import_the_trainer():
    graph = import_graph()
    for name in (n for n in graph if n.startswith("jaxagent.envs")):
        trainer = sorted(m for m in reachable(graph, name) if m.startswith(TRAINER))
        assert not trainer, f"{name} imports the trainer's modules {trainer}"


def test_reading_a_configuration_loads_no_jax():
    code = ("import sys; from jaxagent.config import load_config; load_config('loop_qwen32b'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("table, names", [
    (STAGE_RUNNERS, choices.STAGES),
    (ALGORITHMS, choices.RL_STAGES),
    (advantages.ADVANTAGES, choices.ADVANTAGES),
    (losses.RATIO_OBJECTIVES, choices.RATIO_LEVELS),
    (losses.CLIP_BOUNDS, choices.CLIP_MODES),
    (losses.CRITIC_SCORES, choices.CRITIC_SCORES),
    (SCHEDULES, choices.SCHEDULES),
    ({k: v for k, v in objectives.LOSSES.items() if k != "value"}, choices.LOSS_KINDS),
])
def test_every_registry_implements_exactly_the_names_configurations_accept(table, names):
    assert tuple(table) == tuple(names)


def test_every_algorithm_entry_names_things_that_exist():
    for name, algorithm in ALGORITHMS.items():
        assert algorithm.advantage in advantages.ADVANTAGES or algorithm.advantage == "gae", name
        assert algorithm.keep in KEEP_FILTERS and algorithm.loss in objectives.LOSSES, name
        assert algorithm.ratio_level in (None, *choices.RATIO_LEVELS), name


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long, long
