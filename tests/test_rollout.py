"""The rollout engine with a tiny random model: records are exact, log-probs reproduce, terminations are right."""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxagent.envs.apptown import AppTownEnv
from jaxagent.envs.apptown.env import SYSTEM_PROMPT as APPTOWN_PROMPT
from jaxagent.envs.apptown.tasks import expert_turns, make_task, split_tasks
from jaxagent.envs.base import COMPLETED, CONTEXT_OVERFLOW, ENV_ERROR, MAX_TURNS, Outcome, StepResult
from jaxagent.local_tokenizer import train_tokenizer
from jaxagent.models import ModelConfig, forward, init_params
from jaxagent.rollout import RolloutConfig, collect, truncate_observation
from jaxagent.sampling import Sampler, SamplingError
from jaxagent.tokens import ChatRenderer
from jaxagent.trajectory import through_last_sample

VOCAB = 512
MODEL = ModelConfig(family="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)


@pytest.fixture(scope="module")
def renderer():
    from jaxagent.envs.scienceworld import SYSTEM_PROMPT as SCIENCE_PROMPT
    from jaxagent.envs.scienceworld import ScienceWorldEnv

    science = ScienceWorldEnv("boil/0")  # its first observation teaches the tokenizer ScienceWorld's words
    try:
        science_text = [m["content"] for m in science.reset()] + science.gold_turns()
    finally:
        science.close()
    corpus = [APPTOWN_PROMPT, SCIENCE_PROMPT] + science_text * 3 + [
        make_task(t).instruction + "\n" + "\n".join(expert_turns(make_task(t))) for t in split_tasks("dev")]
    return ChatRenderer(train_tokenizer(corpus, vocab_size=VOCAB))


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.key(0))[0]


def _template_ids(renderer, messages):
    return list(renderer.tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True)["input_ids"])


def check_record(trajectory, renderer):
    """Masks, sampled spans and template spans of a record, checked against independent computations."""
    ids, mask = list(trajectory.token_ids), trajectory.model_mask.astype(bool)
    eot = renderer.end_of_turn_id
    # Sampled spans: one per agent turn, each decoding to the text the environment received.
    runs, start = [], None
    for i, on in enumerate(list(mask) + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    agent_texts = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
    assert len(runs) == len(agent_texts) == trajectory.num_turns
    canonical, previous = [], 0
    for (begin, end), text in zip(runs, agent_texts):
        span = ids[begin:end]
        content = span[:-1] if span[-1] == eot else span
        assert renderer.decode(content) == text
        canonical += ids[previous:begin] + renderer.encode(text) + ([eot] if span[-1] == eot else [])
        previous = end
    canonical += ids[previous:]
    # Prompts, headers and observations are exactly the chat template's tokens for the same conversation.
    expected = _template_ids(renderer, trajectory.messages)
    assert canonical == expected[: len(canonical)]
    assert renderer.decode(expected[len(canonical):]).strip() == ""
    assert np.all(trajectory.sample_logprobs[~mask] == 0)


def check_logprobs(trajectories, params, rows=16):
    """Recomputing log-probs over each record with the same params reproduces the sampled ones (1e-5)."""
    length = -(-max(len(t.token_ids) for t in trajectories) // 128) * 128
    for first in range(0, len(trajectories), rows):
        group = trajectories[first:first + rows]
        tokens = np.zeros((rows, length), np.int32)
        for i, t in enumerate(group):
            tokens[i, : len(t.token_ids)] = t.token_ids
        logp = np.asarray(jax.nn.log_softmax(forward(params, MODEL, jnp.asarray(tokens)).logits_BxTxV, axis=-1))
        for i, t in enumerate(group):
            n, mask = len(t.token_ids), t.model_mask.astype(bool)
            recomputed = np.zeros(n, np.float32)
            recomputed[1:] = logp[i, np.arange(n - 1), t.token_ids[1:]]
            np.testing.assert_allclose(recomputed[mask], t.sample_logprobs[mask], atol=1e-5)


@pytest.mark.slow
def test_64_apptown_episodes_make_exact_records(renderer, params):
    config = RolloutConfig(max_turns=3, max_tokens_per_turn=24, max_context=640, decode_chunk=16, max_concurrent=16,
                           env_workers=8)
    sampler = Sampler(MODEL, max_len=config.max_context)
    tasks = split_tasks("dev")[:32]
    trajectories = collect(sampler, params, renderer, lambda t, seed: AppTownEnv(t), tasks, 2, config,
                           jax.random.key(1))
    assert len(trajectories) == 64
    check_logprobs(trajectories, params)
    assert sorted((t.group_id, t.rollout_index) for t in trajectories) == [(g, k) for g in range(32) for k in range(2)]
    for trajectory in trajectories:
        check_record(trajectory, renderer)
        assert trajectory.termination in (MAX_TURNS, CONTEXT_OVERFLOW, COMPLETED)
        if trajectory.termination == MAX_TURNS:
            assert trajectory.num_turns == 3
        assert len(trajectory.token_ids) <= config.max_context + 1


@pytest.mark.slow
def test_scienceworld_episodes_of_16_task_types_make_exact_records(renderer, params):
    from jaxagent.envs.scienceworld import JvmPool, ScienceWorldEnv
    from jaxagent.envs.scienceworld import split_tasks as science_tasks

    pool = JvmPool(2)  # one JVM per live episode (each costs seconds of CPU to warm up: two suffice)
    config = RolloutConfig(max_turns=2, max_tokens_per_turn=16, max_context=2048, decode_chunk=16, max_concurrent=2,
                           env_workers=2)
    sampler = Sampler(MODEL, max_len=config.max_context)
    tasks = science_tasks("dev")[:16]  # the split lists the task types in turn: 16 different types
    assert len({task.split("/")[0] for task in tasks}) == 16
    try:
        # One rollout per task: the records' exactness does not depend on the group size (the AppTown test above
        # plays groups), and each ScienceWorld episode costs seconds of decoding over its long observations.
        trajectories = collect(sampler, params, renderer, lambda t, seed: ScienceWorldEnv(t, pool=pool), tasks, 1,
                               config, jax.random.key(2))
    finally:
        pool.close()
    assert len(trajectories) == 16
    check_logprobs(trajectories, params)
    for trajectory in trajectories:
        check_record(trajectory, renderer)
        assert trajectory.termination in (MAX_TURNS, CONTEXT_OVERFLOW, COMPLETED), trajectory.info


class ScriptedEnv:
    """Test double: completes after `turns` turns, or fails, hangs or talks a lot, depending on the task id."""

    def __init__(self, task_id: str, seed: int = 0) -> None:
        self.task_id, self.turns, self.closed = task_id, 0, False

    def reset(self):
        if self.task_id == "broken-reset":
            raise RuntimeError("cannot start")
        return [{"role": "system", "content": "Say anything."}, {"role": "user", "content": f"Task {self.task_id}."}]

    def parse_action(self, text):
        return text

    def step(self, text):
        self.turns += 1
        if self.task_id == "raises":
            raise ValueError("the environment crashed")
        if self.task_id == "hangs":
            time.sleep(30)
        if self.task_id == "verbose":
            return StepResult("output " * 400)
        if self.task_id == "completes" and self.turns == 2:
            return StepResult("done", done=True, reward=0.75, info={"tests_passed": 3, "tests_total": 4})
        return StepResult(f"observation {self.turns}")

    def evaluate(self):
        return Outcome(0.25, {"tests_passed": 1, "tests_total": 4})

    def close(self):
        self.closed = True


def test_termination_reasons(renderer, params):
    config = RolloutConfig(max_turns=3, max_tokens_per_turn=12, max_context=256, decode_chunk=8, max_concurrent=4,
                           env_workers=4, env_timeout_s=2.0, max_observation_tokens=40)
    sampler = Sampler(MODEL, max_len=config.max_context)
    tasks = ["completes", "plain", "raises", "hangs", "verbose", "broken-reset"]
    trajectories = collect(sampler, params, renderer, ScriptedEnv, tasks, 1, config, jax.random.key(3))
    by_task = {t.task_id: t for t in trajectories}
    assert set(by_task) == {"completes", "plain", "raises", "hangs", "verbose"}  # a failed reset has no record
    assert by_task["completes"].termination == COMPLETED and by_task["completes"].reward == 0.75
    assert by_task["completes"].num_turns == 2
    assert by_task["plain"].termination == MAX_TURNS and by_task["plain"].num_turns == 3
    assert by_task["plain"].reward == 0.25  # the harness asked the environment to evaluate
    assert by_task["raises"].termination == ENV_ERROR and by_task["raises"].reward == 0.0
    assert "the environment crashed" in by_task["raises"].info["error"]
    assert by_task["hangs"].termination == ENV_ERROR and "timed out" in by_task["hangs"].info["error"]
    verbose = by_task["verbose"]
    observations = [m["content"] for m in verbose.messages if m["role"] == "user"][1:]
    assert observations and all(o.endswith("Execution output is too long and is not fully shown.")
                                for o in observations)
    assert verbose.termination in (MAX_TURNS, CONTEXT_OVERFLOW)
    for trajectory in trajectories:
        check_record(trajectory, renderer)
    check_logprobs(trajectories, params)


def test_context_overflow_ends_the_episode_cleanly(renderer, params):
    config = RolloutConfig(max_turns=10, max_tokens_per_turn=12, max_context=96, decode_chunk=8, max_concurrent=2,
                           env_workers=2, max_observation_tokens=30)
    sampler = Sampler(MODEL, max_len=config.max_context)
    trajectories = collect(sampler, params, renderer, ScriptedEnv, ["verbose", "plain"], 1, config,
                           jax.random.key(4))
    assert {t.termination for t in trajectories} == {CONTEXT_OVERFLOW}
    for trajectory in trajectories:
        # The harness closes the cut turn with an end-of-turn token the model never saw; what the learner keeps
        # (through the last sampled token) fits the context that memory plans are made for.
        assert len(trajectory.token_ids) <= config.max_context + 1 and trajectory.reward == 0.25
        assert len(through_last_sample(trajectory).token_ids) <= config.max_context
        check_record(trajectory, renderer)
    check_logprobs(trajectories, params)


def test_early_stop_drops_the_slowest_rollouts(renderer, params):
    config = RolloutConfig(max_turns=1, max_tokens_per_turn=8, max_context=256, decode_chunk=8, max_concurrent=2,
                           env_workers=2, early_stop_fraction=0.5, early_stop_min_per_task=1)
    sampler = Sampler(MODEL, max_len=config.max_context)
    trajectories = collect(sampler, params, renderer, ScriptedEnv, ["plain", "completes"], 4, config,
                           jax.random.key(5))
    assert 4 <= len(trajectories) < 8
    assert {t.group_id for t in trajectories} == {0, 1}


def test_observations_are_truncated_with_the_note(renderer):
    long_text = "value " * 500
    cut = truncate_observation(renderer, long_text, 50)
    assert cut.endswith("\nExecution output is too long and is not fully shown.")
    assert len(renderer.encode(cut.rsplit("\n", 1)[0])) <= 50
    assert truncate_observation(renderer, "short", 50) == "short"


def test_a_growing_cache_makes_the_same_records(renderer, params):
    """Episodes that outgrow the first cache buckets (16 slots, then 32, ...) with `grow_cache` end with the same
    records as with a cache of max_context slots from the start."""
    config = RolloutConfig(max_turns=2, max_tokens_per_turn=16, max_context=640, decode_chunk=8, max_concurrent=4,
                           env_workers=4, deterministic=True)
    tasks = split_tasks("dev")[:4]

    def run(grow: bool):
        sampler = Sampler(MODEL, max_len=config.max_context, grow_cache=grow)
        return collect(sampler, params, renderer, lambda t, seed: AppTownEnv(t), tasks, 1, config,
                       jax.random.key(3))

    full, growing = run(False), run(True)
    assert len(full) == len(growing) == 4
    for a, b in zip(sorted(full, key=lambda t: t.group_id), sorted(growing, key=lambda t: t.group_id)):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.sample_logprobs, b.sample_logprobs)
        assert a.reward == b.reward and a.termination == b.termination
    assert max(len(t.token_ids) for t in growing) > 256  # the caches grew past several buckets


def test_a_kv_budget_parks_episodes_and_makes_the_same_greedy_records(renderer, params, caplog):
    """Under a KV-cache budget of one whole episode (one row of 640 slots: two rows of 256), four live episodes of up
    to 640 tokens cannot all keep their cache: the latest admitted are parked and rejoin by re-reading their context.
    Greedy decoding then gives the same records as a run without a budget."""
    config = RolloutConfig(max_turns=3, max_tokens_per_turn=16, max_context=640, decode_chunk=8, max_concurrent=4,
                           env_workers=4, deterministic=True, temperature=0.0)
    tasks = split_tasks("dev")[:3]
    budget = Sampler(MODEL, max_len=config.max_context).cache_bytes(1, 640)

    def run(kv_cache_gb: float, **settings):
        sampler = Sampler(MODEL, max_len=config.max_context, grow_cache=True)
        settings = dataclasses.replace(config, kv_cache_gb=kv_cache_gb, **settings)
        records = collect(sampler, params, renderer, lambda t, seed: AppTownEnv(t), tasks, 2, settings,
                          jax.random.key(3))
        return sorted(records, key=lambda t: (t.group_id, t.rollout_index))

    free = run(0.0)
    with caplog.at_level(logging.INFO, logger="jaxagent.rollout"):
        budgeted = run(budget / 2**30)
    parked = [r for r in caplog.records if "KV budget: parking" in r.getMessage()]
    assert parked, "the budget never parked an episode: the test would not exercise re-admission"
    assert len(free) == len(budgeted) == 6
    for a, b in zip(free, budgeted):
        assert np.array_equal(a.token_ids, b.token_ids), a.task_id
        np.testing.assert_allclose(a.sample_logprobs, b.sample_logprobs, atol=1e-4)
        assert a.reward == b.reward and a.termination == b.termination
    assert max(len(t.token_ids) for t in budgeted) > 256
    # Sampled, with environments answering while their episode is parked: every record is still exact.
    sampled = run(budget / 2**30, temperature=1.0, deterministic=False)
    check_logprobs(sampled, params)
    for trajectory in sampled:
        check_record(trajectory, renderer)


def test_a_kv_budget_below_one_episode_is_refused(renderer, params):
    config = RolloutConfig(max_context=640, kv_cache_gb=1e-6)
    sampler = Sampler(MODEL, max_len=640, grow_cache=True)
    with pytest.raises(SamplingError, match=r"rollout.kv_cache_gb=1e-06 cannot hold one episode of "
                                            r"rollout.max_context=640 tokens; valid: >= "):
        collect(sampler, params, renderer, lambda t, seed: AppTownEnv(t), split_tasks("dev")[:1], 1, config,
                jax.random.key(0))
