"""Stage `critic`: SWEET-RL's step-level critic (arXiv 2503.15478), trained with Bradley-Terry on offline pairs.

1. Pairs from the offline trajectories (`critic.data`, default this run's `stages/collect/trajectories.jsonl`): per
   task whose best rollout succeeded, the best against each strictly worse one (`jaxagent.sweet_data`). Whole tasks
   (`critic.held_out` of them) are kept out for evaluation.
2. The critic reads each trajectory with the task's training-time information (the hidden reference) before the
   dialogue; with `critic.use_info: false` it reads only what the agent read (the paper's ablation).
3. Its score of a trajectory is S = the sum over agent turns of the mean log-ratio log π_critic − log π_ref over the
   turn's tokens (`critic.score: turn_sum`, the paper), or one mean over all agent tokens (`trajectory_mean`, the
   public code); the loss is −log σ(β·S(chosen) − β·S(rejected)). π_ref is the critic's frozen start.
4. The critic starts from the policy as the stage starts and trains its own copy of the policy's trainable part
   (its own LoRA adapters on the shared frozen base, or its own full parameters); the policy does not change.

The critic is saved to `stages/<name>/critic` (a policy folder: `jaxagent.checkpoint.load_policy` reads it), with
`critic.json` (what it reads); its reference is the stage's unchanged policy, saved to `stages/<name>/policy` as
every stage's is. The `sweet` stage reads that folder. The stage logs the pairs, the loss (log 2 at the first
step, where the critic equals its reference), the accuracy on its training pairs after training, the held-out pair
accuracy before and after (a tie counts one half), and the critic as a chooser: on the last turn of held-out
trajectories, the success of its best-of-N pick among the policy's replies when replayed in the environment, beside
a random pick's and the best pick's. Its held-out result is the previous stage's (the policy is unchanged). The
critic's train state is checkpointed after every epoch (`checkpoints/<name>`): a run stopped during the stage
continues after the last finished epoch and ends with the critic an uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from jaxagent import distributed
from jaxagent.algorithms.batching import LogprobComputer, per_token_rows
from jaxagent.algorithms.collect import held_out, trajectories_file
from jaxagent.algorithms.common import IterationLoop, PolicyParams, Setup
from jaxagent.algorithms.pair_training import side_logprobs, train_on_pairs
from jaxagent.algorithms.turn_candidates import (
    CRITIC_SETTINGS,
    Critic,
    TurnPrefix,
    sample_candidates,
    score_candidates,
    turn_prefixes,
)
from jaxagent.atomic import staged_file
from jaxagent.checkpoint import Policy, save_policy
from jaxagent.config import OptimConfig
from jaxagent.errors import UserError
from jaxagent.losses import critic_scores
from jaxagent.pairs import Pair
from jaxagent.sweet_data import critic_messages, critic_pairs, read_trajectories, split_by_task
from jaxagent.trajectory import Trajectory, pad_trajectories, turn_indices
from jaxagent.update import LossConfig, UpdateConfig, init_train_state


def run(setup: Setup, stage_index: int, name: str, policy: PolicyParams) -> tuple[PolicyParams, dict]:
    """Train the critic; returns the unchanged policy and its held-out evaluation."""
    config, critic = setup.config, setup.config.critic
    loop = IterationLoop(setup, stage_index, name, 1, checkpoint_every=1)  # for its metrics records
    setup.metrics.truncate_after(stage_index, 0)
    train, kept_out = _pairs(setup)
    frozen = policy.frozen()
    settings = update_config(critic, critic.epochs * math.ceil(len(train) / critic.batch_size))
    _, state = setup.placement.update_step(settings, _initial_state(policy, settings), frozen)
    logprobs = LogprobComputer(setup.model, setup.lora, 1.0, place=setup.placement.batch,
                               fetch=setup.placement.fetch)
    # The reference's log-probs of both pair sets, once: the critic's start scores every trajectory 0 against them.
    start_kept_out, start_train = (side_logprobs(policy, pairs, logprobs, critic.batch_size)
                                   for pairs in (kept_out, train))
    before = pair_accuracy(start_kept_out, start_kept_out, kept_out, critic.score)
    state, trained = train_on_pairs(setup, state, frozen, train, settings, critic.epochs, critic.batch_size,
                                    (config.seed, 10_007 + stage_index), logprobs, start_train, loop.checkpoints)
    loop.close()
    learned = PolicyParams.from_state(state, frozen)
    after = pair_accuracy(side_logprobs(learned, kept_out, logprobs, critic.batch_size), start_kept_out, kept_out,
                          critic.score)
    fitted = pair_accuracy(side_logprobs(learned, train, logprobs, critic.batch_size), start_train, train,
                           critic.score)
    folder = setup.run_dir / "stages" / name
    if distributed.is_first():
        save_policy(folder / "critic",
                    Policy(setup.model, learned.params, setup.lora, learned.lora_params, setup.tokenizer_dir))
        with staged_file(folder / CRITIC_SETTINGS) as tmp:  # what the sweet stage needs to read it as trained
            tmp.write_text(json.dumps({"use_info": critic.use_info, "score": critic.score}))
    distributed.barrier(f"saved the critic of {name}")
    replayed = replay_best_of(setup, policy, Critic(learned, policy, critic.use_info), kept_out, logprobs,
                              jax.random.fold_in(jax.random.key(config.seed), 11_000_027 + stage_index))
    loop.log(1, "train", {"pairs": len(train), "held_out_pairs": len(kept_out), "bt_loss_first": trained["loss_first"],
                          "bt_loss": trained["loss"], "updates": trained["updates"],
                          "train_accuracy": fitted, "held_out_accuracy_start": before, "held_out_accuracy": after,
                          **replayed})
    return policy, held_out(setup, loop, policy)


def replay_best_of(setup: Setup, policy: PolicyParams, critic: Critic, kept_out: list[Pair],
                   logprobs: LogprobComputer, key: jax.Array) -> dict:
    """The critic as a chooser: on the last turn of up to `critic.replay` held-out trajectories the policy samples
    `critic.candidates` replies, every reply is replayed in the environment (the dialogue's earlier agent turns,
    then the reply), and the success of the critic's pick is reported beside a random pick's (the mean over all
    replies) and the best possible pick's."""
    settings = setup.config.critic
    tasks = {pair.chosen.task_id for pair in kept_out}
    records = [r for r in read_trajectories(trajectories_file(setup, settings.data))
               if r["task"]["task_id"] in tasks][:settings.replay]
    prefixes = turn_prefixes(setup, records, last_only=True)
    if not prefixes:
        return {}
    candidates = sample_candidates(setup, policy, prefixes, settings.candidates, 1.0, key)
    scores = score_candidates(setup, critic, logprobs, prefixes, candidates, settings.batch_size)
    jobs = [(prefix, text) for prefix, texts in zip(prefixes, candidates) for text in texts]
    with ThreadPoolExecutor(setup.config.rollout.env_workers) as pool:
        success = np.array(list(pool.map(lambda job: replay(setup, *job), jobs)), np.float64)
    success = success.reshape(len(prefixes), settings.candidates)
    picked = [row[int(np.nanargmax(s))] if not np.isnan(s).all() else row.mean() for row, s in zip(success, scores)]
    n = settings.candidates
    return {"replayed_turns": len(prefixes), f"best_of_{n}_success": float(np.mean(picked)),
            f"random_of_{n}_success": float(success.mean()), f"oracle_of_{n}_success": float(success.max(1).mean())}


def replay(setup: Setup, prefix: TurnPrefix, text: str) -> float:
    """1.0 when the dialogue of `prefix` followed by the reply `text` ends in success, else 0.0 (a reply that does
    not end the episode is scored as the episode stands, as the harness would)."""
    env = setup.make_env(prefix.record["task"]["task_id"], int(prefix.record.get("rollout_index", 0)))
    try:
        env.reset()
        earlier = [m["content"] for m in prefix.messages if m["role"] == "assistant"]
        for turn in earlier:
            if env.step(turn).done:
                return 0.0
        result = env.step(text)
        info = result.info if result.done else env.evaluate().info
        return float(bool(info.get("success")))
    finally:
        env.close()


def _pairs(setup: Setup) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) as the critic reads them."""
    critic = setup.config.critic
    return offline_pairs(setup, critic.data, critic.use_info, critic.held_out)


def offline_pairs(setup: Setup, data: str, with_info: bool, held_out: float) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) of a trajectories file (empty `data`: this run's collect stage's), each side
    tokenized as the reader sees it: with the training-time information in front, or the agent's own view."""
    path = trajectories_file(setup, data)
    records = read_trajectories(path)
    train, kept_out = split_by_task(critic_pairs(records), held_out, setup.config.seed)
    as_pairs = [[Pair(*sides, chosen_is_expert=False) for sides in
                 ((_trajectory(setup, c, with_info), _trajectory(setup, r, with_info)) for c, r in part)
                 if None not in sides] for part in (train, kept_out)]
    if not as_pairs[0]:
        raise UserError(f"{path}: no pairs to train on ({len(records)} trajectories; a task makes pairs only when "
                        "its best rollout succeeded and another did worse, within rollout.max_context)")
    return as_pairs[0], as_pairs[1]


def _trajectory(setup: Setup, record: dict, with_info: bool) -> Trajectory | None:
    """A record as tokens (None when longer than rollout.max_context)."""
    messages = critic_messages(record, with_info)
    conversation = setup.renderer.start(messages)
    ids = np.asarray(conversation.token_ids, np.int32)
    if len(ids) > setup.config.rollout.max_context:
        return None
    mask = np.asarray(conversation.model_mask, np.int8)
    return Trajectory(ids, mask, np.zeros(len(ids), np.float32), turn_indices(mask), float(record["reward"]), 0,
                      int(record.get("rollout_index", 0)), record["task"]["task_id"],
                      {"success": bool(record.get("success"))}, tuple(messages))


def _initial_state(policy: PolicyParams, settings: UpdateConfig):
    """The critic's own copy of the policy's trainable part (the update step donates its state's buffers; the
    policy's must survive: it is the critic's reference and the stage's result)."""
    return init_train_state(jax.tree.map(jnp.copy, policy.trainable()), settings)


def pair_accuracy(critic_logp: list[np.ndarray], reference_logp: list[np.ndarray], pairs: list[Pair],
                  score: str) -> float:
    """The fraction of pairs whose chosen side the critic scores higher (ties count one half); NaN without pairs.
    The log-probs are `side_logprobs` of the critic and of its reference."""
    if not pairs:
        return float("nan")
    sides = [t for pair in pairs for t in (pair.chosen, pair.rejected)]
    scores = side_scores(critic_logp, reference_logp, sides, score)
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(scores[::2], scores[1::2])]
    return float(np.mean(wins))


def side_scores(critic_logp: list[np.ndarray], reference_logp: list[np.ndarray], sides: list[Trajectory],
                score: str) -> np.ndarray:
    """The critic's score of each trajectory, [len(sides)]. Every side is scored in one call on rows padded to a
    length bucket (the padding is masked out and changes no score): one call per side would compile the score's
    programs again for every distinct length."""
    padded = pad_trajectories(sides)
    count, length = padded["model_mask"].shape
    critic_rows, reference_rows = (per_token_rows(logp, count, length) for logp in (critic_logp, reference_logp))
    return np.asarray(critic_scores(jnp.asarray(critic_rows), jnp.asarray(reference_rows),
                                    jnp.asarray(padded["model_mask"]), jnp.asarray(padded["turn_index"]), score))


def update_config(critic, steps: int) -> UpdateConfig:
    """Bradley-Terry at `critic.beta` with the configured score; AdamW, constant after its warm-up."""
    optim = OptimConfig(lr=critic.lr, weight_decay=critic.weight_decay, max_grad_norm=critic.max_grad_norm,
                        schedule="constant", warmup_steps=int(critic.warmup_fraction * steps))
    return UpdateConfig(LossConfig(kind="bradley_terry", beta=critic.beta, critic_score=critic.score), optim)
