"""SWEET-RL's turn-level machinery: candidate actions at each turn of offline trajectories, scored by the critic.

At every agent turn of an offline trajectory the dialogue so far (the agent's view: no training-time information)
is a prefix. The policy samples candidate replies to each prefix; the critic scores each candidate by its turn
advantage A(o_t, a_t, c) = mean over the candidate's tokens of log π_critic − log π_ref (β scales every candidate
alike, so the ranking needs no β), reading the training-time information c first when it was trained to.

A critic is a folder written by the `critic` stage: `critic/` (the trained critic), `policy/` (its frozen start,
π_ref) and `critic.json` (what it reads: `use_info`, `score`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from jaxagent import distributed
from jaxagent.algorithms.batching import LogprobComputer
from jaxagent.algorithms.common import PolicyParams, Setup
from jaxagent.checkpoint import is_policy_folder
from jaxagent.envs.base import Message
from jaxagent.errors import UserError
from jaxagent.sampling import SamplingParams
from jaxagent.sweet_data import critic_messages
from jaxagent.trajectory import Trajectory, turn_indices

CRITIC_SETTINGS = "critic.json"


@dataclasses.dataclass(frozen=True)
class TurnPrefix:
    """The dialogue before one agent turn of an offline trajectory."""

    record: dict  # the trajectory (trajectories.jsonl line) it comes from
    turn: int  # which agent turn (0-based) follows it
    messages: tuple[Message, ...]  # the agent's view up to that turn


@dataclasses.dataclass
class Critic:
    """A trained critic, its frozen start (the reference of its log-ratio) and whether it reads c."""

    model: PolicyParams
    reference: PolicyParams
    use_info: bool


def load_critic(setup: Setup, folder: Path) -> Critic:
    """The critic a `critic` stage wrote to `folder` (its stage folder)."""
    settings = folder / CRITIC_SETTINGS
    for path in (folder / "critic", folder / "policy"):
        if not is_policy_folder(path):
            raise UserError(f"{str(folder)!r} holds no finished critic ({path.name}/ is missing); give the folder of "
                            "a finished critic stage, e.g. RUN/stages/critic, or run the critic stage first")
    if not settings.is_file():
        raise UserError(f"{str(folder)!r} has no {CRITIC_SETTINGS}; it was not written by the critic stage")
    use_info = bool(json.loads(settings.read_text())["use_info"])
    model, reference = (PolicyParams(*setup.placement.load_policy(folder / part)) for part in ("critic", "policy"))
    return Critic(model, reference, use_info)


def turn_prefixes(setup: Setup, records: Sequence[dict], last_only: bool = False) -> list[TurnPrefix]:
    """The prefix before each agent turn of `records` (or before the last one), leaving out those whose prompt and
    a full turn would not fit in rollout.max_context."""
    rollout = setup.config.rollout
    prefixes = []
    for record in records:
        messages = record["messages"]
        agent_at = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        for turn, index in enumerate(agent_at):
            if last_only and turn != len(agent_at) - 1:
                continue
            prefix = tuple(dict(m) for m in messages[:index])
            if len(_prompt_ids(setup, prefix)) + rollout.max_tokens_per_turn <= rollout.max_context:
                prefixes.append(TurnPrefix(record, turn, prefix))
    return prefixes


def _prompt_ids(setup: Setup, messages: Sequence[Message]) -> list[int]:
    conversation = setup.renderer.start(messages)
    conversation.add_generation_prompt()
    return conversation.token_ids


def sample_candidates(setup: Setup, policy: PolicyParams, prefixes: Sequence[TurnPrefix], count: int,
                      temperature: float, key: jax.Array) -> list[list[str]]:
    """`count` replies of the policy to each prefix (sampled at `temperature`, one turn of at most
    rollout.max_tokens_per_turn tokens each). In a multi-process run each process samples every P-th prefix."""
    rollout = setup.config.rollout
    mine = distributed.share_of(len(prefixes)) if jax.process_count() > 1 else list(range(len(prefixes)))
    params, lora_params = setup.sampler.place_params(policy.params, policy.lora_params)
    sampling = SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=rollout.max_tokens_per_turn,
                              stop_token_ids=(setup.renderer.end_of_turn_id,))
    rows = [(p, _prompt_ids(setup, prefixes[p].messages)) for p in mine for _ in range(count)]
    key = jax.random.fold_in(key, jax.process_index())
    texts: dict[int, list[str]] = {p: [] for p in mine}
    for start in range(0, len(rows), rollout.max_concurrent):
        part = rows[start:start + rollout.max_concurrent]
        batch = setup.sampler.start(params, [ids for _, ids in part], lora_params)
        _, generation = setup.sampler.generate(params, batch, sampling, jax.random.fold_in(key, start),
                                               lora_params=lora_params)
        for (p, _), tokens in zip(part, generation.tokens):
            texts[p].append(_reply_text(setup, tokens))
    if jax.process_count() == 1:
        return [texts[p] for p in range(len(prefixes))]
    gathered = {p: t for part in distributed.gather_objects(texts) for p, t in part.items()}
    return [gathered[p] for p in range(len(prefixes))]


def _reply_text(setup: Setup, tokens: Sequence[int]) -> str:
    """The text of a sampled turn, as the rollout engine hands it to the environment (without its end-of-turn)."""
    tokens = list(tokens)
    if tokens and tokens[-1] == setup.renderer.end_of_turn_id:
        tokens = tokens[:-1]
    return setup.renderer.decode(tokens)


def turn_trajectory(setup: Setup, messages: Sequence[Message], task_id: str) -> Trajectory | None:
    """A conversation whose last message is the agent turn being judged, as tokens with the model mask on that turn
    only (earlier agent turns are context); None when longer than rollout.max_context."""
    conversation = setup.renderer.start(messages)
    ids = np.asarray(conversation.token_ids, np.int32)
    if len(ids) > setup.config.rollout.max_context:
        return None
    mask = np.asarray(conversation.model_mask, np.int8)
    turns = turn_indices(mask)
    mask = (turns == turns.max()).astype(np.int8)
    return Trajectory(ids, mask, np.zeros(len(ids), np.float32), turn_indices(mask), 0.0, 0, 0, task_id, {},
                      tuple(messages))


def with_reply(prefix: TurnPrefix, text: str) -> list[Message]:
    return [*prefix.messages, {"role": "assistant", "content": text}]


def score_candidates(setup: Setup, critic: Critic, logprobs: LogprobComputer, prefixes: Sequence[TurnPrefix],
                  candidates: Sequence[Sequence[str]], rows: int) -> list[np.ndarray]:
    """Each candidate's turn advantage under the critic (NaN where the critic's view would not fit)."""
    views = [turn_trajectory(setup, critic_messages({**prefix.record, "messages": with_reply(prefix, text)},
                                                    critic.use_info), prefix.record["task"]["task_id"])
             for prefix, texts in zip(prefixes, candidates) for text in texts]
    fitting = [v for v in views if v is not None]
    trained = logprobs(critic.model.params, critic.model.lora_params, None, fitting, rows)[0] if fitting else []
    start = logprobs(critic.reference.params, critic.reference.lora_params, None, fitting, rows)[0] if fitting else []
    advantages = iter(float(np.sum((a - b) * v.model_mask) / max(v.model_mask.sum(), 1))
                      for a, b, v in zip(trained, start, fitting))
    flat = np.array([next(advantages) if v is not None else np.nan for v in views], np.float64)
    sizes = np.cumsum([0, *[len(texts) for texts in candidates]])
    return [flat[sizes[i]:sizes[i + 1]] for i in range(len(candidates))]
