"""ScienceWorld through the `scienceworld` package (its Java server runs in a JVM; Java >= 8 must be installed).

Task ids are "<task name>/<variation>"; the splits are the package's own train/dev/test variations, and `seen` /
`unseen` name dev / test as ETO's paper does. The agent answers in ETO's format, "Thought: ...\\nAction: <action>",
and the action is the text after the last "Action:". The reward is the maximum score seen in the episode / 100
(ETO's definition: a later failure does not erase progress). The gold action sequences are the expert trajectories.

Two protocols (`env.options.protocol`):
* `package` (default): all 30 task types; an episode ends when the game says so or after 50 actions (twice the gold
  path's length when the expert plays, so that it can finish).
* `eto`: ETO's evaluation (arXiv 2403.02502): the 24 task types it measured (the three inclined-plane types, the two
  Mendelian-genetics types and measuring the melting point of an unknown substance are left out, in every split)
  and its per-type action limits (`ETO_STEP_LIMITS`; the expert may take as many as its gold path has).

`env.options.types` (a list of task type names) narrows either protocol to those types, e.g. the short
`find-*` tasks for a quick run.

JVMs are expensive (~0.7 s to start, hundreds of MB), so episodes borrow them from a `JvmPool`: a run's episodes share
one pool of at most `rollout.max_concurrent` JVMs (`start_pool`; those idle for a minute are stopped), and an episode
made without one starts a JVM of its own. A JVM that dies is replaced and the episode's actions are replayed on the
new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from jaxagent.atomic import staged_file
from jaxagent.cache import cache_dir
from jaxagent.envs.base import EnvError, EnvSpec, Message, Outcome, StepResult

log = logging.getLogger(__name__)

SIMPLIFICATION = "easy"
JVM_HEAP = "-Xmx768m"
# An episode waiting for a JVM of the run's pool waits for other episodes to end (expert demonstrations play on more
# threads than the pool has JVMs): minutes on a slow machine, not a fault.
RUN_POOL_WAIT_S = 600.0
# A run's JVMs idle this long (an update phase, not the gap between two episodes) are stopped, to free their memory;
# the next collection starts new ones (~0.7 s each).
RUN_POOL_IDLE_STOP_S = 60.0
DEFAULT_STEP_LIMIT = 50  # actions per episode unless the task's gold path asks for more
SYSTEM_PROMPT = (
    "You are a scientist exploring a house with rooms, objects and substances, doing the experiment you are asked "
    "to do. Each turn, think briefly, then give exactly one action, as:\nThought: <your reasoning>\n"
    "Action: <one action>\nActions include: look around, inventory, go to LOCATION, open OBJ, close OBJ, "
    "pick up OBJ, put OBJ in OBJ, move OBJ to OBJ, activate OBJ, deactivate OBJ, use OBJ on OBJ, pour OBJ in OBJ, "
    "mix OBJ, focus on OBJ, look at OBJ, read OBJ, connect OBJ to OBJ, wait, wait1."
)
# ETO's 24 task types and the actions an episode of each may take.
ETO_STEP_LIMITS = {
    "boil": 100, "melt": 80, "freeze": 80, "change-the-state-of-matter-of": 80,
    "use-thermometer": 30, "measure-melting-point-known-substance": 120,
    "power-component": 20, "power-component-renewable-vs-nonrenewable-energy": 30,
    "test-conductivity": 30, "test-conductivity-of-unknown-substances": 30,
    "find-living-thing": 15, "find-non-living-thing": 15, "find-plant": 15, "find-animal": 15,
    "grow-plant": 30, "grow-fruit": 60,
    "chemistry-mix": 60, "chemistry-mix-paint-secondary-color": 15, "chemistry-mix-paint-tertiary-color": 30,
    "lifespan-longest-lived": 10, "lifespan-shortest-lived": 10, "lifespan-longest-lived-then-shortest-lived": 12,
    "identify-life-stages-1": 30, "identify-life-stages-2": 30,
}
PROTOCOLS = ("package", "eto")
SPLIT_NAMES = {"train": "train", "dev": "dev", "test": "test", "seen": "dev", "unseen": "test"}
NO_ACTION = "No action found. End your reply with a line 'Action: <one action>'."


def require_java() -> None:
    """Fail with the command that installs Java when it is missing."""
    if shutil.which("java") is None:
        raise EnvError("ScienceWorld needs Java >= 8 and `java` is not on PATH; install it with "
                       "`apt-get install -y default-jre-headless` (Debian/Ubuntu) or `brew install openjdk` (macOS)")


def _new_jvm(step_limit: int = 100) -> Any:
    require_java()
    from scienceworld import ScienceWorldEnv

    with _capped_java_heap():
        return ScienceWorldEnv("", envStepLimit=step_limit)


_java_options_lock = threading.Lock()
_java_starts = 0  # JVM starts in flight, which all need the heap cap in the environment
_saved_java_options: str | None = None


@contextlib.contextmanager
def _capped_java_heap():
    """JAVA_TOOL_OPTIONS with `JVM_HEAP` added while JVMs start, and as it was once none is starting.

    The package starts Java without options, and a bounded heap keeps a pool of JVMs within a laptop's memory. The
    variable is process-wide and pools start JVMs on several threads at once, so the first start in flight sets it
    and the last one restores it: each restoring its own saved value would leave the cap set for good, or take it
    away from a JVM still starting.
    """
    global _java_starts, _saved_java_options
    with _java_options_lock:
        if _java_starts == 0:
            _saved_java_options = os.environ.get("JAVA_TOOL_OPTIONS")
            os.environ["JAVA_TOOL_OPTIONS"] = (f"{_saved_java_options} {JVM_HEAP}" if _saved_java_options
                                               else JVM_HEAP)
        _java_starts += 1
    try:
        yield
    finally:
        with _java_options_lock:
            _java_starts -= 1
            if _java_starts == 0:
                if _saved_java_options is None:
                    os.environ.pop("JAVA_TOOL_OPTIONS", None)
                else:
                    os.environ["JAVA_TOOL_OPTIONS"] = _saved_java_options


class JvmPool:
    """Up to `capacity` ScienceWorld JVMs shared by episodes: acquire one for an episode, release it after.

    With `idle_stop_s`, a thread stops JVMs left idle that long, so that a run's JVMs do not hold their memory
    through a long update phase between two collections (episodes of one collection re-borrow them within seconds).
    """

    def __init__(self, capacity: int = 4, wait_s: float = 30.0, idle_stop_s: float | None = None) -> None:
        self.capacity, self.wait_s, self.idle_stop_s = capacity, wait_s, idle_stop_s
        self._idle: list[tuple[Any, float]] = []  # (JVM, when it was released), the most recent last
        self._created = 0
        self._closed = False
        self._changed = threading.Condition()
        if idle_stop_s is not None:
            threading.Thread(target=self._stop_idle, name="jvm-pool-idle", daemon=True).start()

    def acquire(self) -> Any:
        """The most recently released JVM, a new one while under capacity, or wait for either."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._closed or self._idle or self._created < self.capacity,
                                          self.wait_s):
                raise EnvError(f"no ScienceWorld JVM free after {self.wait_s:g} s: {self.capacity} are in use; run "
                               f"at most {self.capacity} episodes at once (rollout.max_concurrent) or enlarge the "
                               "pool")
            if self._closed:  # its JVMs would outlive the run: nothing stops them any more
                raise EnvError("the ScienceWorld JVM pool is closed; episodes of a finished run cannot start")
            if self._idle:
                return self._idle.pop()[0]
            self._created += 1
        try:
            return _new_jvm()
        except BaseException:
            self._forget_one()
            raise

    def release(self, jvm: Any) -> None:
        """Return a JVM for the next episode (or stop it, if the pool has closed meanwhile)."""
        with self._changed:
            if not self._closed:
                self._idle.append((jvm, time.monotonic()))
                self._changed.notify_all()
                return
        self.discard(jvm)

    def discard(self, jvm: Any) -> None:
        """Stop a JVM (one that died, or one no longer needed); its slot becomes free."""
        try:
            jvm.close()
        except Exception:  # noqa: BLE001 - it is already broken
            pass
        self._forget_one()

    def close(self) -> None:
        """Stop every idle JVM now, each borrowed one when it is released, and the idle-stopping thread."""
        with self._changed:
            idle, self._idle, self._closed = self._idle, [], True
            self._changed.notify_all()
        for jvm, _ in idle:
            self.discard(jvm)

    def _forget_one(self) -> None:
        with self._changed:
            self._created -= 1
            self._changed.notify_all()

    def _stop_idle(self) -> None:
        """Every half `idle_stop_s`, stop the JVMs idle longer than `idle_stop_s`, until the pool closes."""
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closed, self.idle_stop_s / 2)
                if self._closed:
                    return
                cutoff = time.monotonic() - self.idle_stop_s
                stale = [jvm for jvm, released in self._idle if released < cutoff]
                self._idle = [(jvm, released) for jvm, released in self._idle if released >= cutoff]
            for jvm in stale:
                self.discard(jvm)


def game_step(jvm: Any, action: str) -> tuple[str, bool, int]:
    """(observation, done, score 0-100) of one action, as the package's `step` computes them.

    The package's `step` also lists every valid action-object combination (and the room, inventory and task) for
    its info dict: ~30 ms of a ~35 ms step. Episodes here read only the observation, the score and whether the game
    ended, so they ask the game for just those.
    """
    observation = jvm.server.step(action)
    score = int(round(100 * jvm.server.getScore()))
    jvm.lastStepScore = score  # the package's own bookkeeping, kept consistent for its other methods
    done = bool(jvm.server.getCompleted()) or jvm.server.getNumMoves() > jvm.envStepLimit or score < 0
    return observation, done, score


def game_reset(jvm: Any) -> str:
    """The package's `reset` without its info dict: back to the first move, then "look around"."""
    jvm.server.reset()
    jvm.lastStepScore = 0
    return game_step(jvm, "look around")[0]


@lru_cache(maxsize=1)
def _variations() -> dict[str, dict[str, list[int]]]:
    """{task name: {split: variations}}: the package decides the splits, and reading them takes a JVM ~10 s (it loads
    all 30 task types), so the table is kept in a file keyed by the package's game (its jar's digest)."""
    path = variations_file()
    try:
        return _checked_table(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass  # absent, unreadable or not a table: read it from the game
    table = _variations_from_jvm()
    try:
        with staged_file(path) as tmp:
            tmp.write_text(json.dumps(table))
    except OSError as err:  # a read-only home still runs, only slower to start
        log.warning("cannot keep ScienceWorld's split table in %s (%s); it is read from a JVM each run", path, err)
    return table


def variations_file() -> Path:
    """The file `_variations` keeps its table in: in jaxagent's cache folder (`jaxagent.cache`), named by the
    digest of the package's jar, so another game version gets its own."""
    from scienceworld.constants import JAR_PATH

    digest = hashlib.sha256(Path(JAR_PATH).read_bytes()).hexdigest()[:16]
    return cache_dir() / "scienceworld" / f"variations-{digest}.json"


def _variations_from_jvm() -> dict[str, dict[str, list[int]]]:
    jvm = _new_jvm()
    try:
        table = {}
        for name in jvm.get_task_names():
            jvm.load(name, 0, SIMPLIFICATION)
            table[name] = {"train": list(jvm.get_variations_train()), "dev": list(jvm.get_variations_dev()),
                           "test": list(jvm.get_variations_test())}
        return table
    finally:
        jvm.close()


def _checked_table(table: Any) -> dict[str, dict[str, list[int]]]:
    """`table` if it has the table's shape; ValueError otherwise (a damaged file is read again from the game)."""
    rows = list(table.values()) if isinstance(table, dict) else []
    shaped = bool(rows) and all(isinstance(row, dict) and set(row) == {"train", "dev", "test"} for row in rows)
    if not shaped or not all(isinstance(i, int) for row in rows for ids in row.values() for i in ids):
        raise ValueError("not a ScienceWorld split table")
    return table


def check_protocol(protocol: str) -> str:
    """`protocol`, or a one-line error naming the valid ones."""
    if protocol not in PROTOCOLS:
        raise EnvError(f"env.options.protocol={protocol!r} is not a ScienceWorld protocol; valid: "
                       f"{', '.join(PROTOCOLS)}")
    return protocol


def split_tasks(split: str, protocol: str = "package", types: Sequence[str] | None = None) -> list[str]:
    """Every "<task>/<variation>" of a split (under `eto`, of its 24 task types only; of `types` when given), taking
    the task types in turn: the first N tasks (`eval.tasks`, `sft.demos`) cover every type evenly, not the first
    type's variations."""
    if split not in SPLIT_NAMES:
        raise EnvError(f"unknown ScienceWorld split {split!r}; valid: {', '.join(SPLIT_NAMES)}")
    table = _variations()
    names = [name for name in table if check_protocol(protocol) == "package" or name in ETO_STEP_LIMITS]
    if types is not None:
        unknown = [name for name in types if name not in names]
        if unknown:
            raise EnvError(f"env.options.types names {', '.join(map(repr, unknown))}, not a task type of protocol "
                           f"{protocol!r}; valid: {', '.join(names)}")
        names = [name for name in names if name in types]
    per_type = [[f"{name}/{v}" for v in table[name][SPLIT_NAMES[split]]] for name in names]
    return [task for turn in itertools.zip_longest(*per_type) for task in turn if task is not None]


def _tasks(split: str, options: dict) -> list[str]:
    unknown = set(options) - {"protocol", "types"}
    if unknown:
        raise EnvError(f"unknown ScienceWorld option(s) {', '.join(sorted(unknown))} in env.options; valid: "
                       "protocol, types")
    return split_tasks(split, options.get("protocol", "package"), options.get("types"))


def parse_task_id(task_id: str) -> tuple[str, int]:
    """('boil', 3) from 'boil/3'."""
    name, _, variation = task_id.rpartition("/")
    if not name or not variation.isdigit():
        raise EnvError(f"bad ScienceWorld task id {task_id!r}; expected '<task name>/<variation>', e.g. 'boil/0'")
    return name, int(variation)


@dataclasses.dataclass
class _Episode:
    jvm: Any
    actions: list[str]
    best_score: float
    steps: int
    step_limit: int
    gold: list[str] | None


class ScienceWorldEnv:
    """One ScienceWorld episode (jaxagent's wrapper; the package's class of the same name is the game)."""

    def __init__(self, task_id: str, seed: int = 0, pool: JvmPool | None = None, step_limit: int | None = None,
                 protocol: str = "package", types: Sequence[str] | None = None) -> None:
        """`types` (env.options.types) only narrows the task lists; an episode runs whatever task it is given."""
        self.task_id, self.seed = task_id, seed
        self.task_name, self.variation = parse_task_id(task_id)
        self.protocol = check_protocol(protocol)
        if protocol == "eto" and self.task_name not in ETO_STEP_LIMITS:
            raise EnvError(f"ScienceWorld task {task_id!r} is not one of the 24 types of protocol 'eto'; use one of "
                           f"{', '.join(ETO_STEP_LIMITS)}, or protocol 'package'")
        self._pool, self._own_pool = (pool, False) if pool is not None else (JvmPool(1), True)
        self._step_limit = step_limit
        self._episode: _Episode | None = None

    def reset(self) -> list[Message]:
        """Load the task variation; returns the instructions and the task with the first look around."""
        self._release()
        jvm = self._pool.acquire()
        observation = self._load(jvm)
        self._episode = _Episode(jvm, [], 0.0, 0, self._step_limit or self._protocol_limit(), None)
        task = jvm.get_task_description()
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"{task}\n\n{observation}"}]

    def parse_action(self, text: str) -> str | None:
        """The text after the last 'Action:' (one line)."""
        lines = [line for line in text.splitlines() if line.strip().lower().startswith("action:")]
        if not lines:
            return None
        action = lines[-1].split(":", 1)[1].strip()
        return action or None

    def step(self, text: str) -> StepResult:
        """Apply the turn's action; ends on the game's 'done', or at the step limit."""
        episode = self._current()
        episode.steps += 1
        action = self.parse_action(text)
        if action is None:
            observation, done = NO_ACTION, False
        else:
            observation, done, score = self._act(action)
            episode.best_score = max(episode.best_score, score)
        if done or episode.steps >= episode.step_limit:
            outcome = self.evaluate()
            return StepResult(observation, done=True, reward=outcome.reward, info=outcome.info)
        return StepResult(observation)

    def evaluate(self) -> Outcome:
        """Reward = best score seen / 100."""
        episode = self._current()
        reward = max(0.0, min(episode.best_score, 100.0)) / 100.0
        return Outcome(reward, {"score": episode.best_score, "success": episode.best_score >= 100,
                                "steps": episode.steps, "tests_passed": int(episode.best_score >= 100),
                                "tests_total": 1})

    def gold_turns(self) -> list[str]:
        """The expert: the gold action sequence in the agent's format (call right after `reset`)."""
        episode = self._current()
        if episode.gold is None:
            if episode.actions:
                raise RuntimeError("gold_turns() must be called before the first step")
            # Generating the gold path makes loading slower, so it happens only when the expert is asked for.
            self._load(episode.jvm, gold=True)
            episode.gold = list(episode.jvm.get_gold_action_sequence())
            if self._step_limit is None:
                room = len(episode.gold) if self.protocol == "eto" else 2 * len(episode.gold)
                episode.step_limit = max(self._protocol_limit(), room)
        return [f"Thought: The next step of the experiment is to {action}.\nAction: {action}"
                for action in episode.gold]

    def expert_turns(self, mistake_rate: float = 0.0, rng=None) -> list[str]:
        """The expert for behaviour cloning: the gold turns (this environment has no mistake model)."""
        if mistake_rate:
            raise EnvError(f"sft.mistake_rate={mistake_rate}: the ScienceWorld expert has no mistake model; use 0")
        return self.gold_turns()

    def close(self) -> None:
        """Give the JVM back to the pool."""
        self._release()
        if self._own_pool:
            self._pool.close()

    # ---- internals ---------------------------------------------------------------------------------------------

    def _protocol_limit(self) -> int:
        return ETO_STEP_LIMITS[self.task_name] if self.protocol == "eto" else DEFAULT_STEP_LIMIT

    def _load(self, jvm: Any, gold: bool = False) -> str:
        jvm.load(self.task_name, self.variation, SIMPLIFICATION, generateGoldPath=gold)
        return game_reset(jvm)

    def _act(self, action: str) -> tuple[str, bool, float]:
        episode = self._current()
        for attempt in range(2):
            try:
                observation, done, score = game_step(episode.jvm, action)
                episode.actions.append(action)
                return observation, done, float(score)
            except Exception as err:  # noqa: BLE001 - py4j raises many kinds when the JVM dies
                if attempt:
                    raise
                log.warning("ScienceWorld JVM failed (%s); restarting it and replaying %d actions", err,
                            len(episode.actions))
                self._pool.discard(episode.jvm)
                episode.jvm = self._pool.acquire()
                self._load(episode.jvm)
                for previous in episode.actions:
                    game_step(episode.jvm, previous)
        raise AssertionError("unreachable")

    def _current(self) -> _Episode:
        if self._episode is None:
            raise RuntimeError("call reset() before step()")
        return self._episode

    def _release(self) -> None:
        if self._episode is not None:
            self._pool.release(self._episode.jvm)
            self._episode = None


def start_pool(options: dict, concurrency: int) -> JvmPool:
    """The run's JVMs: one per episode in play at once, started on demand and lent to episode after episode (an
    episode that starts while all are in use waits for one; the caller closes the pool)."""
    return JvmPool(capacity=concurrency, wait_s=RUN_POOL_WAIT_S, idle_stop_s=RUN_POOL_IDLE_STOP_S)


def make(task_id: str, seed: int = 0, service: JvmPool | None = None, **options: Any) -> ScienceWorldEnv:
    """One episode on the run's JVM pool (`service`), or on a JVM of its own without one."""
    return ScienceWorldEnv(task_id, seed, pool=service, **options)


SPEC = EnvSpec(name="scienceworld", make=make, tasks=_tasks, splits=tuple(SPLIT_NAMES), start=start_pool)
