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

from jaxagent.buckets import round_up
from jaxagent.config import TRUNCATION_NOTE, RolloutConfig
from jaxagent.envs.base import COMPLETED, CONTEXT_OVERFLOW, ENV_ERROR, MAX_TURNS, Environment, Outcome, StepResult
from jaxagent.sampling import Batch, Sampler, SamplingError, SamplingParams
from jaxagent.tokens import ChatRenderer, Conversation
from jaxagent.trajectory import Trajectory, turn_indices

log = logging.getLogger(__name__)
GIB = 2**30


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
    order: int = 0  # admission order: under a KV budget the earliest admitted keep their cache rows

    def cached_tokens(self) -> list[int]:
        """What this episode's cache row holds (its context so far: the conversation, then this turn's tokens)."""
        if self.conversation is None:
            return []
        return (list(self.conversation.token_ids) + self.turn_ids)[: self.synced]


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
        self.budget = int(config.kv_cache_gb * GIB)  # bytes of KV cache per device; 0: none
        if self.budget and sampler.cache_bytes(1, config.max_context) > self.budget:
            need = sampler.cache_bytes(1, config.max_context) / GIB
            raise SamplingError(f"rollout.kv_cache_gb={config.kv_cache_gb:g} cannot hold one episode of "
                                f"rollout.max_context={config.max_context} tokens; valid: >= {need:.4g} (or 0)")
        self.parked: collections.deque[_Episode] = collections.deque()  # live episodes without a cache row
        self.admitted = 0

    def run(self, tasks: Sequence[str], rollouts_per_task: int) -> list[Trajectory]:
        pending = collections.deque((task, g, k) for g, task in enumerate(tasks) for k in range(rollouts_per_task))
        total = len(pending)
        budgeted = self.budget > 0
        # Without a budget every row exists from the start; with one, rows are admitted as the budget allows.
        rows: list[_Episode | None] = [None] * (0 if budgeted else min(self.config.max_concurrent, total))
        finished: list[_Episode] = []
        batch: Batch | None = None
        try:
            for row in range(len(rows)):
                rows[row] = self._start(*pending.popleft(), row)
            while any(e is not None for e in rows) or self.parked or (budgeted and pending):
                prompts, chunks = self._poll_environments(rows, finished, block=not self._any_generating(rows))
                if budgeted:
                    batch, rows, prompts, chunks = self._admit(batch, rows, pending, prompts, chunks)
                batch = self._feed(batch, rows, prompts, chunks)
                for row, episode in enumerate(rows):
                    if episode is not None and episode.outcome is not None:
                        rows[row] = self._start(*pending.popleft(), row) if pending and not budgeted else None
                if self._stop_early(finished, total, len(tasks)):
                    break
                if batch is not None and budgeted and self._any_generating(rows):
                    batch, rows = self._room_to_decode(batch, rows)
                if batch is not None and self._any_generating(rows):
                    batch = self._decode(batch, rows, finished)
        finally:
            for episode in [*rows, *self.parked]:
                if episode is not None and episode.outcome is None:
                    self.closing.append(self.workers.submit(episode.env.close))
            _wait_all(self.closing, timeout=60.0)  # sandboxes and JVMs are released before we return
            self.workers.shutdown()
        return [self._record(e) for e in finished]

    # ---- scheduling ---------------------------------------------------------------------------------------------

    def _start(self, task_id: str, group: int, index: int, row: int) -> _Episode:
        env = self.make_env(task_id, group * 1000 + index)
        episode = _Episode(task_id, group, index, env, row=row, order=self.admitted)
        self.admitted += 1
        self._dispatch(episode, "reset", env.reset)
        return episode

    # ---- the KV budget ----------------------------------------------------------------------------------------
    # The cache is one [rows, slots] block: its bytes grow with the longest live episode times the row bucket. Before
    # each sampler call the engine picks which episodes hold rows, first come first served, so that block stays
    # within the budget: a parked episode keeps its records and rejoins later by re-reading its context.

    def _admit(self, batch, rows, pending, prompts, chunks):
        """Rows for the next writes: the live and parked episodes that fit (earliest first), then new episodes while
        room remains. Returns the batch, rows and writes re-addressed to the new rows."""
        lengths = batch.lengths if batch is not None else np.zeros(len(rows), np.int64)

        def need(episode: _Episode) -> int:
            if episode.row < 0:  # parked: its whole context is written again
                return self._need(episode, 0, episode.synced)
            if episode.row in prompts:
                return self._need(episode, 0, len(prompts[episode.row]))
            return self._need(episode, int(lengths[episode.row]), len(chunks.get(episode.row, ())))

        candidates = sorted(_live(rows) + list(self.parked), key=lambda e: e.order)
        kept, slots = self._first_that_fit(candidates, need)
        starting = []
        while (pending and len(kept) == len(candidates) and len(kept) + len(starting) < self.config.max_concurrent
               and self._fits(len(kept) + len(starting) + 1, slots)):
            starting.append(pending.popleft())
        return self._arrange(batch, rows, kept, starting, slots, prompts, chunks)

    def _room_to_decode(self, batch: Batch, rows):
        """Rows for the next decode chunk: the generating rows need room for it; the latest admitted are parked
        when the cache would outgrow the budget."""
        def need(episode: _Episode) -> int:
            return self._need(episode, int(batch.lengths[episode.row]), 0)

        candidates = sorted(_live(rows), key=lambda e: e.order)
        kept, slots = self._first_that_fit(candidates, need)
        batch, rows, _, _ = self._arrange(batch, rows, kept, [], slots, {}, {})
        return batch, rows

    def _first_that_fit(self, candidates: list[_Episode], need: Callable[[_Episode], int]
                        ) -> tuple[list[_Episode], int]:
        """The longest prefix of `candidates` whose rows and longest need fit the budget, and the slots it needs.
        The first always fits (checked when the engine starts), so the earliest episode always progresses."""
        kept: list[_Episode] = []
        slots = self.sampler.slots_for(0, 1)
        for episode in candidates:
            wanted = max(slots, need(episode))
            if len(kept) >= self.config.max_concurrent or not self._fits(len(kept) + 1, wanted):
                break
            kept.append(episode)
            slots = wanted
        return kept, slots

    def _need(self, episode: _Episode, length: int, written: int) -> int:
        """Slots the row of `episode` (holding `length` tokens) needs for `written` more tokens in one chunk, then,
        if it generates, its next decode chunk: admission looks ahead to the decode, so that what `_admit` lets in,
        `_room_to_decode` keeps (no episode re-reads its context only to be parked again)."""
        slots = self.sampler.slots_for(length, written, appended=True)
        if self._generating(episode):
            slots = max(slots, self.sampler.slots_for(length + written, self._turn_budget(episode)))
        return slots

    def _fits(self, rows: int, slots: int) -> bool:
        return self.sampler.cache_bytes(rows, slots) <= self.budget

    def _arrange(self, batch, rows, kept, starting, slots, prompts, chunks):
        """Give `kept` and the new `starting` episodes rows in a cache of `slots` slots; park the other live ones.
        In place when the current rows have room, else by moving the kept rows into a new batch."""
        live = _live(rows)
        kept_ids = {id(e) for e in kept}
        parked_now = [e for e in live if id(e) not in kept_ids]
        joining = [e for e in kept if e.row < 0]  # parked earlier, rejoining
        free = [r for r, e in enumerate(rows) if e is None or e.outcome is not None]
        current = batch.state.cache.segment_ids_BxS.shape[1] if batch is not None else 0
        in_place = (batch is not None and not parked_now and len(free) >= len(joining) + len(starting)
                    and self._fits(len(rows), max(slots, current)))
        if in_place:
            if slots > current:
                batch = self.sampler.reserve(batch, slots)
            targets = iter(free)
        else:
            for episode in parked_now:
                log.info("KV budget: parking %s/%d (%d tokens) to make room", episode.task_id,
                         episode.rollout_index, episode.synced)
                episode.row = -1
                self.parked.append(episode)
            staying = [e for e in live if id(e) in kept_ids]
            wanted = len(staying) + len(joining) + len(starting)
            if not wanted:
                return batch, rows, prompts, chunks
            size = round_up(wanted, self.sampler.batch_buckets, "batch size")
            layout = [e.row for e in staying] + [None] * (size - len(staying))
            if batch is None:
                batch = self.sampler.empty(size, slots)
            else:
                batch = self.sampler.relayout(batch, layout, slots)
            moved = {e.row: new for new, e in enumerate(staying)}
            prompts = {moved[r]: p for r, p in prompts.items() if r in moved}
            chunks = {moved[r]: c for r, c in chunks.items() if r in moved}
            for new, episode in enumerate(staying):
                episode.row = new
            rows = staying + [None] * (size - len(staying))
            targets = iter(range(len(staying), size))
        for episode in joining:
            episode.row = next(targets)
            rows[episode.row] = episode
            self.parked.remove(episode)
            prompts[episode.row] = episode.cached_tokens()  # [] still clears a row a finished episode left
        for task in starting:
            row = next(targets)
            rows[row] = self._start(*task, row)
        return batch, rows, prompts, chunks

    def _dispatch(self, episode: _Episode, kind: str, fn: Callable, *args: Any) -> None:
        episode.job, episode.job_kind = self.workers.submit(fn, *args), kind
        episode.job_deadline = time.monotonic() + self.config.env_timeout_s

    @classmethod
    def _any_generating(cls, rows: list[_Episode | None]) -> bool:
        return any(cls._generating(e) for e in rows)

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
        waiting = [e for e in [*rows, *self.parked] if e is not None and e.job is not None]
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
                if episode.row >= 0:  # a parked episode writes its context when it rejoins
                    prompts[episode.row] = list(episode.conversation.token_ids)
                episode.synced = len(episode.conversation.token_ids)
            else:
                chunk = self._after_step(episode, result, finished)
                if chunk and episode.row >= 0:
                    chunks[episode.row] = chunk
        if self.parked:
            self.parked = collections.deque(e for e in self.parked if e.outcome is None)
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

    @staticmethod
    def _generating(episode: _Episode | None) -> bool:
        return episode is not None and episode.job is None and episode.outcome is None

    def _turn_budget(self, episode: _Episode) -> int:
        """Tokens this episode may still generate in its turn (per-turn and context limits)."""
        turn_room = self.config.max_tokens_per_turn - len(episode.turn_ids)
        context_room = self.config.max_context - episode.synced
        return max(0, min(turn_room, context_room, self.config.decode_chunk))

    def _decode(self, batch: Batch, rows, finished) -> Batch:
        active = [self._generating(e) for e in rows]
        budgets = [self._turn_budget(e) if on else 0 for e, on in zip(rows, active)]
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


def _live(rows: list[_Episode | None]) -> list[_Episode]:
    """The episodes in `rows` that are still running, in row order."""
    return [e for e in rows if e is not None and e.outcome is None]


def _wait_any(futures: list[Future], timeout: float) -> None:
    wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)


def _wait_all(futures: list[Future], timeout: float) -> None:
    wait(futures, timeout=timeout)
