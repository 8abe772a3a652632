"""Stage `dpo`: multi-turn DPO on offline pairs, SWEET-RL's baseline ("multi-turn DPO", arXiv 2503.15478).

The pairs are the critic's (per task whose best rollout succeeded, the best against each strictly worse one, from
`dpo.data`, default this run's `stages/collect/trajectories.jsonl`), read as the agent saw them (no training-time
information). Trajectory-level sigmoid DPO (log-probs summed over the agent's tokens, plus `dpo.nll_coef` times the
chosen side's mean NLL) runs `dpo.epochs` epochs against the policy as the stage starts, then the policy is
evaluated. A run stopped during the stage trains again from the stage's start.
"""

from __future__ import annotations

import math

import numpy as np

from jaxagent.algorithms.batching import LogprobComputer
from jaxagent.algorithms.common import IterationLoop, PolicyParams, Setup, eval_seed, evaluate
from jaxagent.algorithms.critic import offline_pairs
from jaxagent.algorithms.pair_training import side_logprobs, train_on_pairs
from jaxagent.config import OptimConfig
from jaxagent.pairs import Pair
from jaxagent.update import LossConfig, UpdateConfig, init_train_state


def run(setup: Setup, stage_index: int, name: str, policy: PolicyParams) -> tuple[PolicyParams, dict]:
    """DPO on the offline pairs; returns the trained policy and its held-out evaluation."""
    config, dpo = setup.config, setup.config.dpo
    loop = IterationLoop(setup, stage_index, name, 1, checkpoint_every=1)  # for its metrics records
    setup.metrics.truncate_after(stage_index, 0)
    pairs, _ = offline_pairs(setup, dpo.data, with_info=False, held_out=0.0)
    frozen = policy.frozen()
    settings = update_config(dpo, dpo.epochs * math.ceil(len(pairs) / dpo.batch_size))
    _, state = setup.placement.update_step(settings, init_train_state(policy.trainable(), settings), frozen)
    logprobs = LogprobComputer(setup.model, setup.lora, 1.0, place=setup.placement.batch,
                               fetch=setup.placement.fetch)
    reference = side_logprobs(policy, pairs, logprobs, dpo.batch_size)  # before any update
    state, trained = train_on_pairs(setup, state, frozen, pairs, settings, dpo.epochs, dpo.batch_size,
                                    (config.seed, 20_011 + stage_index), logprobs, reference)
    learned = PolicyParams.from_state(state, frozen)
    loop.log(1, "train", {"pairs": len(pairs), "dpo_loss_first": trained["loss_first"], "dpo_loss": trained["loss"],
                          "updates": trained["updates"],
                          "margin_accuracy": margin_accuracy(learned, pairs, reference, logprobs, dpo.batch_size)})
    stats, _ = evaluate(setup, learned, eval_seed(config, stage_index, 1))
    loop.log(1, "eval", stats)
    return learned, stats


def margin_accuracy(policy: PolicyParams, pairs: list[Pair], reference: list[np.ndarray],
                    logprobs: LogprobComputer, rows: int) -> float:
    """The fraction of pairs whose DPO margin (chosen's summed log-ratio to the reference minus rejected's) is > 0;
    `reference` holds the log-probs of each pair's chosen then rejected side."""
    sides = [t for pair in pairs for t in (pair.chosen, pair.rejected)]
    now = logprobs(policy.params, policy.lora_params, None, sides, rows)[0]
    ratios = [float(np.sum((a - b) * t.model_mask)) for a, b, t in zip(now, reference, sides)]
    return float(np.mean([c > r for c, r in zip(ratios[::2], ratios[1::2])]))


def update_config(dpo, steps: int) -> UpdateConfig:
    """Sigmoid DPO at `dpo.beta` with the NLL term; AdamW, constant after its warm-up."""
    optim = OptimConfig(lr=dpo.lr, weight_decay=dpo.weight_decay, max_grad_norm=dpo.max_grad_norm,
                        schedule="constant", warmup_steps=int(dpo.warmup_fraction * steps))
    return UpdateConfig(LossConfig(kind="dpo", beta=dpo.beta, nll_coef=dpo.nll_coef), optim)
