"""The multi-turn rollout engine: many episodes decode in one sampler batch while environments step on the host.

`collect` runs N tasks x K rollouts. Live episodes share one sampler batch (at most `max_concurrent` rows); decoding
proceeds in chunks of `decode_chunk` tokens, and between chunks every row whose turn ended (end-of-turn token, or the
per-turn token limit) hands its text to a worker thread that steps its environment, while the other rows go on
decoding. When an environment answers, the observation is rendered with the chat template, appended to that row's
cache, and the row rejoins; a finished episode's row is refilled with the next pending episode.

Invariant per episode: the sampler's cache for its row holds exactly `conversation.token_ids[:synced]`; every
non-generated token (template text, observations, an end-of-turn the harness added) reaches the cache as part of
the next appended chunk. Nothing is re-tokenized: the record's ids are the ones the model saw and produced.

Limits: turns, tokens per turn, total context (the episode ends cleanly with reason "context_overflow"), and
observations longer than `max_observation_tokens` are cut with a note. An environment that raises or exceeds
`env_timeout_s` ends its episode with reward 0 and reason "env_error"; the round goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxagent.config import TRUNCATION_NOTE, RolloutConfig
from jaxagent.envs.base import COMPLETED, CONTEXT_OVERFLOW, ENV_ERROR, MAX_TURNS, Environment, Outcome, StepResult
from jaxagent.sampling import Batch, Sampler, SamplingParams
from jaxagent.tokens import ChatRenderer, Conversation
from jaxagent.trajectory import Trajectory, turn_indices

log = logging.getLogger(__name__)



class EnvWorkers:
    """Daemon threads that step environments; a thread stuck in a hung environment is abandoned and replaced."""

    def __init__(self, count: int) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._threads = 0
        for _ in range(count):
            self._spawn()

    def submit(self, fn: Callable, *args: Any) -> Future:
        """Run `fn(*args)` on a worker; the future carries its result or exception."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def replace_stuck(self) -> None:
        """Add a thread for one that is stuck in a job that timed out."""
        self._spawn()

    def shutdown(self) -> None:
        """Let idle threads exit (stuck ones die with the process; they are daemons)."""
        for _ in range(self._threads):
            self._jobs.put(None)

    def _spawn(self) -> None:
        self._threads += 1
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # an environment's failure is data for the engine
                future.set_exception(err)


@dataclasses.dataclass
class _Episode:
    task_id: str
    group_id: int
    rollout_index: int
    env: Environment
    conversation: Conversation | None = None
    row: int = -1
    synced: int = 0  # conversation tokens already in the sampler's cache
    turns: int = 0
    turn_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)  # one per sampled token, in order
    job: Future | None = None
    job_kind: str = ""  # "reset" or "step"
    job_deadline: float = 0.0
    outcome: Outcome | None = None
    termination: str = ""


def truncate_observation(renderer: ChatRenderer, text: str, max_tokens: int, note: str = TRUNCATION_NOTE) -> str:
    """`text` cut to its first `max_tokens` tokens, with `note` appended, when it is longer."""
    ids = renderer.encode(text)
    if len(ids) <= max_tokens:
        return text
    return renderer.decode(ids[:max_tokens]) + "\n" + note


def collect(sampler: Sampler, params: dict, renderer: ChatRenderer, make_env: Callable[[str, int], Environment],
            tasks: Sequence[str], rollouts_per_task: int, config: RolloutConfig, rng: jax.Array,
            lora_params: dict | None = None) -> list[Trajectory]:
    """Run `rollouts_per_task` episodes of every task; returns the finished ones as trajectory records.

    `make_env(task_id, seed)` creates an environment. Group ids are indices into `tasks`; rollout indices count
    0..K-1 within a task. With early stopping the unfinished episodes are dropped.
    """
    if sampler.max_len < config.max_context:
        raise ValueError(f"sampler.max_len={sampler.max_len} is below rollout.max_context={config.max_context}")
    engine = _Engine(sampler, params, lora_params, renderer, make_env, config, rng)
    return engine.run(tasks, rollouts_per_task)


class _Engine:
    """One collection round (see `collect`)."""

    def __init__(self, sampler, params, lora_params, renderer, make_env, config: RolloutConfig, rng) -> None:
        self.sampler = sampler
        self.params, self.lora_params = sampler.place_params(params, lora_params)
        self.renderer, self.make_env, self.config, self.rng = renderer, make_env, config, rng
        self.sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                       max_new_tokens=config.decode_chunk,
                                       stop_token_ids=(renderer.end_of_turn_id,))
        self.workers = EnvWorkers(config.env_workers)
        self.closing: list[Future] = []

    def run(self, tasks: Sequence[str], rollouts_per_task: int) -> list[Trajectory]:
        pending = collections.deque((task, g, k) for g, task in enumerate(tasks) for k in range(rollouts_per_task))
        total = len(pending)
        rows: list[_Episode | None] = [None] * min(self.config.max_concurrent, total)
        finished: list[_Episode] = []
        batch: Batch | None = None
        try:
            for row in range(len(rows)):
                rows[row] = self._start(*pending.popleft(), row)
            while any(e is not None for e in rows):
                prompts, chunks = self._poll_environments(rows, finished, block=not self._any_generating(rows))
                batch = self._feed(batch, rows, prompts, chunks)
                for row, episode in enumerate(rows):
                    if episode is not None and episode.outcome is not None:
                        rows[row] = self._start(*pending.popleft(), row) if pending else None
                if self._stop_early(finished, total, len(tasks)):
                    break
                if batch is not None and self._any_generating(rows):
                    batch = self._decode(batch, rows, finished)
        finally:
            for episode in rows:
                if episode is not None and episode.outcome is None:
                    self.closing.append(self.workers.submit(episode.env.close))
            _wait_all(self.closing, timeout=60.0)  # sandboxes and JVMs are released before we return
            self.workers.shutdown()
        return [self._record(e) for e in finished]

    # ---- scheduling ---------------------------------------------------------------------------------------------

    def _start(self, task_id: str, group: int, index: int, row: int) -> _Episode:
        env = self.make_env(task_id, group * 1000 + index)
        episode = _Episode(task_id, group, index, env, row=row)
        self._dispatch(episode, "reset", env.reset)
        return episode

    def _dispatch(self, episode: _Episode, kind: str, fn: Callable, *args: Any) -> None:
        episode.job, episode.job_kind = self.workers.submit(fn, *args), kind
        episode.job_deadline = time.monotonic() + self.config.env_timeout_s

    @staticmethod
    def _any_generating(rows: list[_Episode | None]) -> bool:
        return any(e is not None and e.job is None and e.outcome is None for e in rows)

    def _stop_early(self, finished: list[_Episode], total: int, num_tasks: int) -> bool:
        if not self.config.early_stop_fraction or len(finished) >= total:
            return False
        per_task = collections.Counter(e.group_id for e in finished)
        enough = all(per_task[g] >= self.config.early_stop_min_per_task for g in range(num_tasks))
        return len(finished) >= self.config.early_stop_fraction * total and enough

    # ---- environments -----------------------------------------------------------------------------------------

    def _poll_environments(self, rows, finished, block: bool) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """Apply every finished environment job; returns new prompts and chunks to append, by row."""
        prompts: dict[int, list[int]] = {}
        chunks: dict[int, list[int]] = {}
        waiting = [e for e in rows if e is not None and e.job is not None]
        if waiting and self.config.deterministic:
            latest = max(e.job_deadline for e in waiting)
            _wait_all([e.job for e in waiting], max(0.0, latest - time.monotonic()))
        elif block and waiting:
            earliest = min(e.job_deadline for e in waiting)
            _wait_any([e.job for e in waiting], max(0.0, earliest - time.monotonic()))
        for episode in waiting:
            job = episode.job
            if not job.done() and time.monotonic() < episode.job_deadline:
                continue
            episode.job = None
            if not job.done():
                job.cancel()
                self.workers.replace_stuck()
                self._finish(episode, finished, Outcome(0.0, {"error": f"environment timed out after "
                                                              f"{self.config.env_timeout_s:g} s"}), ENV_ERROR)
                continue
            try:
                result = job.result()
            except Exception as err:  # noqa: BLE001 - any environment failure ends only that episode
                log.warning("environment %s failed: %s", episode.task_id, err)
                self._finish(episode, finished, Outcome(0.0, {"error": f"{type(err).__name__}: {err}"}), ENV_ERROR)
                continue
            if episode.job_kind == "reset":
                episode.conversation = self.renderer.start(result)
                episode.conversation.add_generation_prompt()
                if len(episode.conversation.token_ids) >= self.config.max_context:
                    self._finish_by_harness(episode, finished, CONTEXT_OVERFLOW)  # the prompt alone is too long
                    continue
                prompts[episode.row] = list(episode.conversation.token_ids)
                episode.synced = len(episode.conversation.token_ids)
            else:
                chunk = self._after_step(episode, result, finished)
                if chunk:
                    chunks[episode.row] = chunk
        return prompts, chunks

    def _after_step(self, episode: _Episode, result: StepResult, finished) -> list[int] | None:
        if result.done:
            self._finish(episode, finished, Outcome(result.reward, dict(result.info)), COMPLETED)
            return None
        if episode.turns >= self.config.max_turns:
            self._finish_by_harness(episode, finished, MAX_TURNS)
            return None
        conversation = episode.conversation
        before = conversation.mark()
        text = truncate_observation(self.renderer, result.observation, self.config.max_observation_tokens,
                                    self.config.truncation_note)
        conversation.add_message({"role": "user", "content": text})
        conversation.add_generation_prompt()
        if len(conversation.token_ids) >= self.config.max_context:
            # The observation does not fit: the model never sees it, so the record stops before it.
            conversation.rollback(before)
            self._finish_by_harness(episode, finished, CONTEXT_OVERFLOW)
            return None
        chunk = conversation.token_ids[episode.synced:]
        episode.synced = len(conversation.token_ids)
        return chunk

    def _finish_by_harness(self, episode: _Episode, finished, reason: str) -> None:
        try:
            outcome = episode.env.evaluate()
        except Exception as err:  # noqa: BLE001
            outcome, reason = Outcome(0.0, {"error": f"{type(err).__name__}: {err}"}), ENV_ERROR
        self._finish(episode, finished, outcome, reason)

    def _finish(self, episode: _Episode, finished: list[_Episode], outcome: Outcome, reason: str) -> None:
        episode.outcome, episode.termination = outcome, reason
        self.closing.append(self.workers.submit(episode.env.close))
        if episode.conversation is not None:
            finished.append(episode)

    # ---- the sampler ------------------------------------------------------------------------------------------

    def _feed(self, batch: Batch | None, rows, prompts: dict[int, list[int]], chunks: dict[int, list[int]]):
        """Write new prompts (refilling rows) and appended chunks into the sampler batch."""
        if batch is None:
            if not prompts:
                return None
            # Rows whose environment is still starting hold a one-token stand-in until they are refilled.
            ordered = [prompts.get(row, [0]) for row in range(len(rows))]
            return self.sampler.start(self.params, ordered, self.lora_params)
        if prompts:
            batch = self.sampler.refill(self.params, batch, prompts, self.lora_params)
        if chunks:
            batch = self.sampler.append(self.params, batch, [chunks.get(r) for r in range(batch.rows)],
                                        self.lora_params)
        return batch

    def _decode(self, batch: Batch, rows, finished) -> Batch:
        active = [e is not None and e.job is None and e.outcome is None for e in rows]
        budgets = []
        for e, on in zip(rows, active):
            if not on:
                budgets.append(0)
                continue
            turn_room = self.config.max_tokens_per_turn - len(e.turn_ids)
            context_room = self.config.max_context - e.synced
            budgets.append(max(0, min(turn_room, context_room)))
        self.rng, key = jax.random.split(self.rng)
        batch, result = self.sampler.generate(self.params, batch, self.sampling, key, active=active,
                                              lora_params=self.lora_params, max_new_tokens=budgets)
        for row, episode in enumerate(rows):
            if not active[row]:
                continue
            tokens, logprobs = result.tokens[row], result.logprobs[row]
            episode.turn_ids += tokens
            episode.logprobs += [float(x) for x in logprobs]
            episode.synced += len(tokens)
            reason = result.stop_reasons[row]
            if reason == "stop_token" or len(episode.turn_ids) >= self.config.max_tokens_per_turn:
                self._end_turn(episode)
            elif episode.synced >= self.config.max_context or reason == "cache_full":
                episode.conversation.add_generated(episode.turn_ids)
                episode.turn_ids = []
                self._finish_by_harness(episode, finished, CONTEXT_OVERFLOW)
        return batch

    def _end_turn(self, episode: _Episode) -> None:
        text = episode.conversation.add_generated(episode.turn_ids)
        episode.turn_ids = []
        episode.turns += 1
        self._dispatch(episode, "step", episode.env.step, text)

    # ---- records ------------------------------------------------------------------------------------------------

    def _record(self, episode: _Episode) -> Trajectory:
        conversation = episode.conversation
        ids = np.asarray(conversation.token_ids, np.int32)
        mask = np.asarray(conversation.model_mask, np.int8)
        logprobs = np.zeros(len(ids), np.float32)
        sampled = mask.astype(bool)
        if sampled.sum() != len(episode.logprobs):
            raise AssertionError(f"{episode.task_id}: {sampled.sum()} sampled tokens but {len(episode.logprobs)} "
                                 "log-probs; the record would be misaligned")
        logprobs[sampled] = np.asarray(episode.logprobs, np.float32)
        info = {**episode.outcome.info, "termination": episode.termination, "turns": episode.turns}
        info.setdefault("success", bool(episode.outcome.reward >= 1.0))
        return Trajectory(ids, mask, logprobs, turn_indices(mask), float(np.clip(episode.outcome.reward, 0.0, 1.0)),
                          episode.group_id, episode.rollout_index, episode.task_id, info,
                          tuple(conversation.messages))


def _wait_any(futures: list[Future], timeout: float) -> None:
    wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)


def _wait_all(futures: list[Future], timeout: float) -> None:
    wait(futures, timeout=timeout)
