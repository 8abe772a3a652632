"""Stage `sweet`: SWEET-RL's policy improvement (arXiv 2503.15478), turn-level DPO ranked by the critic.

1. Prefixes: the dialogue before every agent turn of the offline trajectories (`sweet.data`, default this run's
   `stages/collect/trajectories.jsonl`; all, or `sweet.trajectories` of them), as the agent saw it.
2. Candidates: the policy samples `sweet.candidates` replies to each prefix at `sweet.temperature`.
3. Ranking: the critic (`sweet.critic`, default this run's `stages/critic`) scores each reply by its turn
   advantage, reading the training-time information when it was trained with it (`jaxagent.algorithms.
   turn_candidates`).
4. Pairs: per prefix, `sweet.pairs_per_turn` pairs of a random top-half reply (chosen) against a random bottom-half
   one (rejected), distinct replies only.
5. Turn-level DPO on the agent's view: the log-probs of the turn's reply alone (the prefix is context), sigmoid DPO
   at `sweet.beta` plus `sweet.nll_coef` times the chosen reply's NLL, against the policy as the stage starts; then
   the policy is evaluated.

A run stopped during the stage runs it again from the stage's start.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import jax
import numpy as np

from jaxagent.algorithms.batching import LogprobComputer
from jaxagent.algorithms.collect import trajectories_file
from jaxagent.algorithms.common import IterationLoop, PolicyParams, Setup, eval_seed, evaluate
from jaxagent.algorithms.dpo import margin_accuracy, update_config
from jaxagent.algorithms.pair_training import side_logprobs, train_on_pairs
from jaxagent.algorithms.turn_candidates import (
    TurnPrefix,
    load_critic,
    sample_candidates,
    score_candidates,
    turn_prefixes,
    turn_trajectory,
    with_reply,
)
from jaxagent.errors import UserError
from jaxagent.pairs import Pair
from jaxagent.sweet_data import read_trajectories
from jaxagent.update import init_train_state


def run(setup: Setup, stage_index: int, name: str, policy: PolicyParams) -> tuple[PolicyParams, dict]:
    """Rank sampled replies with the critic and train the policy on them; returns it and its evaluation."""
    config, sweet = setup.config, setup.config.sweet
    loop = IterationLoop(setup, stage_index, name, 1, checkpoint_every=1)  # for its metrics records
    setup.metrics.truncate_after(stage_index, 0)
    critic = load_critic(setup, Path(sweet.critic) if sweet.critic else setup.run_dir / "stages" / "critic")
    prefixes = turn_prefixes(setup, _records(setup))
    key = jax.random.fold_in(jax.random.key(config.seed), 9_000_011 + stage_index)
    candidates = sample_candidates(setup, policy, prefixes, sweet.candidates, sweet.temperature, key)
    logprobs = LogprobComputer(setup.model, setup.lora, 1.0, place=setup.placement.batch,
                               fetch=setup.placement.fetch)
    scores = score_candidates(setup, critic, logprobs, prefixes, candidates, sweet.batch_size)
    del critic  # its two models are not needed for the policy's update
    rng = np.random.default_rng([config.seed, 30_011 + stage_index])
    chosen_rejected = [pair for prefix, texts, score in zip(prefixes, candidates, scores)
                       for pair in ranked_pairs(texts, score, sweet.pairs_per_turn, rng, prefix)]
    pairs = actor_pairs(setup, chosen_rejected)
    if not pairs:
        raise UserError(f"sweet: no pairs from {len(prefixes)} turns (every turn's replies were identical or too "
                        "long for rollout.max_context)")
    frozen = policy.frozen()
    settings = update_config(sweet, sweet.epochs * math.ceil(len(pairs) / sweet.batch_size))
    _, state = setup.placement.update_step(settings, init_train_state(policy.trainable(), settings), frozen)
    reference = side_logprobs(policy, pairs, logprobs, sweet.batch_size)  # before any update
    state, trained = train_on_pairs(setup, state, frozen, pairs, settings, sweet.epochs, sweet.batch_size,
                                    (config.seed, 40_009 + stage_index), logprobs, reference)
    learned = PolicyParams.from_state(state, frozen)
    gaps = [better - worse for *_, better, worse in chosen_rejected]
    loop.log(1, "train", {"turns": len(prefixes), "candidates": sum(len(c) for c in candidates),
                          "distinct_candidates": float(np.mean([len(set(c)) / len(c) for c in candidates])),
                          "pairs": len(pairs), "advantage_gap": float(np.mean(gaps)),
                          "dpo_loss_first": trained["loss_first"], "dpo_loss": trained["loss"],
                          "updates": trained["updates"],
                          "margin_accuracy": margin_accuracy(learned, pairs, reference, logprobs, sweet.batch_size)})
    stats, _ = evaluate(setup, learned, eval_seed(config, stage_index, 1))
    loop.log(1, "eval", stats)
    return learned, stats


def _records(setup: Setup) -> list[dict]:
    sweet = setup.config.sweet
    records = read_trajectories(trajectories_file(setup, sweet.data))
    if sweet.trajectories and sweet.trajectories < len(records):
        records = random.Random(setup.config.seed).sample(records, sweet.trajectories)
    return records


def ranked_pairs(texts: list[str], scores: np.ndarray, count: int, rng: np.random.Generator, prefix: TurnPrefix
                 ) -> list[tuple[TurnPrefix, str, str, float, float]]:
    """Up to `count` (prefix, chosen, rejected, chosen score, rejected score): a random reply of the better-scored
    half against a random one of the worse half, each reply used once, never two identical replies."""
    scored = [i for i in rng.permutation(len(texts)) if not np.isnan(scores[i])]  # shuffled: ties fall at random
    ranked = sorted(scored, key=lambda i: -scores[i])
    half = len(ranked) // 2
    top, bottom = list(rng.permutation(ranked[:half])), list(rng.permutation(ranked[half:]))
    pairs = []
    for better in top:
        if len(pairs) == count:
            break
        worse = next((w for w in bottom if texts[w] != texts[better]), None)
        if worse is not None:
            bottom.remove(worse)
            pairs.append((prefix, texts[better], texts[worse], float(scores[better]), float(scores[worse])))
    return pairs


def actor_pairs(setup: Setup, chosen_rejected) -> list[Pair]:
    """The pairs as the policy reads them: the agent's view of the prefix, then the reply (the only tokens scored)."""
    pairs = []
    for prefix, chosen, rejected, _, _ in chosen_rejected:
        task_id = prefix.record["task"]["task_id"]
        sides = [turn_trajectory(setup, with_reply(prefix, text), task_id) for text in (chosen, rejected)]
        if None not in sides:
            pairs.append(Pair(*sides, chosen_is_expert=False))
    return pairs
