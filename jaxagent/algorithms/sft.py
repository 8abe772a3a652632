"""Behaviour cloning: negative log-likelihood of the agent's tokens in expert conversations.

The demonstrations are played once through the real environment (or read from a JSONL file), rendered with the
chat template into ids and model-token masks, and cached in the run folder, so a resumed run trains on exactly the
same data. Each epoch visits them in a seeded random order (with `sft.group_by_length`, batched by similar length
within windows of that order); the position (step) is the data state a checkpoint keeps.
"""

from __future__ import annotations

import json
import logging
import math

import jax
import numpy as np

from jaxagent import distributed
from jaxagent.algorithms.batching import sequence_batch
from jaxagent.algorithms.common import IterationLoop, PolicyParams, Setup, eval_seed, evaluate
from jaxagent.atomic import staged_file
from jaxagent.data import DataError, expert_demonstrations, read_conversations
from jaxagent.envs.registry import list_tasks
from jaxagent.trajectory import Trajectory, turn_indices
from jaxagent.update import LossConfig, UpdateConfig, init_train_state

log = logging.getLogger(__name__)


def demonstrations(setup: Setup) -> list[dict]:
    """The stage's conversations, [{"messages", "reward"}], generated once and cached in the run folder."""
    cache = setup.run_dir / "sft_demos.jsonl"
    config = setup.config

    def play_and_save() -> None:
        if config.sft.data == "expert":
            tasks = list_tasks(config.env.name, config.env.train_split, config.env.options)
            played = expert_demonstrations(setup.make_env, tasks, config.sft.demos, config.sft.mistake_rate,
                                           config.seed)
            demos = [{"messages": messages, "reward": reward} for messages, reward in played]
        else:
            demos = [{"messages": messages, "reward": None} for messages in read_conversations(config.sft.data)]
        with staged_file(cache) as tmp:
            tmp.write_text("".join(json.dumps(d) + "\n" for d in demos))

    distributed.written_by_first(cache, play_and_save)  # every process then reads the same file
    return [json.loads(line) for line in cache.read_text().splitlines()]


def to_trajectories(setup: Setup, demos: list[dict]) -> list[Trajectory]:
    """Token-level records of the conversations that fit the context (longer ones are skipped with a warning)."""
    records = []
    for i, demo in enumerate(demos):
        conversation = setup.renderer.start(demo["messages"])
        ids = np.asarray(conversation.token_ids, np.int32)
        if len(ids) > setup.config.rollout.max_context:
            log.warning("demonstration %d has %d tokens, more than rollout.max_context=%d; skipped", i, len(ids),
                        setup.config.rollout.max_context)
            continue
        mask = np.asarray(conversation.model_mask, np.int8)
        reward = float(demo["reward"]) if demo.get("reward") is not None else 1.0
        records.append(Trajectory(ids, mask, np.zeros(len(ids), np.float32), turn_indices(mask), reward, i, 0,
                                  f"demo/{i}", {"success": reward >= 1.0}, tuple(demo["messages"])))
    if not records:
        raise DataError("no demonstration fits rollout.max_context; raise it or shorten the conversations")
    return records


def run(setup: Setup, stage_index: int, name: str, policy: PolicyParams) -> tuple[PolicyParams, dict]:
    """Train on the demonstrations for `sft.epochs` epochs (or until the loss is below `sft.stop_loss`); returns the
    policy and its held-out evaluation."""
    config, sft = setup.config, setup.config.sft
    records = to_trajectories(setup, demonstrations(setup))
    demo_rewards = [r.reward for r in records]
    steps_per_epoch = math.ceil(len(records) / sft.batch_size)
    total = sft.epochs * steps_per_epoch
    frozen = policy.frozen()
    update, fresh = setup.placement.update_step(update_config(sft), init_train_state(policy.trainable(),
                                                                                     update_config(sft)), frozen)
    loop = IterationLoop(setup, stage_index, name, total, checkpoint_every=sft.checkpoint_every)
    state, meta, start = loop.resume(fresh)
    if meta.get("stopped"):  # the last checkpoint is the one sft.stop_loss ended training at
        start = total + 1
    if start == 1:
        loop.log(0, "data", {"demos": len(records), "demo_reward": float(np.mean(demo_rewards)),
                             "demo_success": float(np.mean([r >= 1.0 for r in demo_rewards]))})
    losses, batches, lengths = [], None, [len(r.token_ids) for r in records]
    try:
        for step in loop.progress(start):
            epoch, position = divmod(step - 1, steps_per_epoch)
            if position == 0 or batches is None:  # an epoch's batches depend only on its number: a resume redraws them
                batches = epoch_batches(lengths, sft.batch_size, sft.group_by_length,
                                        np.random.default_rng([config.seed, stage_index, epoch]))
            chosen = batches[position]
            rows = sequence_batch([records[i] for i in chosen], rows=sft.batch_size, pack=sft.pack)
            batch = setup.placement.batch(rows)
            state, metrics = update(state, frozen, batch, jax.random.fold_in(jax.random.key(config.seed), step))
            losses.append(float(metrics["loss"]))
            loop.show(loss=losses[-1])
            stopped = False
            if step % sft.log_every == 0 or step == total:
                stopped = ends_on_loss(sft, losses)
                loop.log(step, "train", {"loss": float(np.mean(losses)), "epoch": epoch + 1,
                                         "grad_norm": float(metrics["grad_norm"])})
                losses = []
                if stopped:
                    print(f"{name}: the mean loss of steps {step - sft.log_every + 1}-{step} is below sft.stop_loss="
                          f"{sft.stop_loss}; training ends at step {step} of at most {total}", flush=True)
            if step == total or stopped:  # evaluated before the last checkpoint, so a resumed run never repeats it
                stats, _ = evaluate(setup, PolicyParams.from_state(state, frozen),
                                    seed=eval_seed(config, stage_index, step))
                loop.log(step, "eval", stats)
            loop.maybe_checkpoint(step, state, {"epoch": epoch, "position": position + 1, "stopped": stopped},
                                  last=stopped)
            if stopped:
                break
    finally:
        loop.close()
    return PolicyParams.from_state(state, frozen), loop.last_eval()


# With `group_by_length`, demonstrations of similar length are batched together within windows of this many
# batches: a batch pads to its longest row, so this trains on far fewer padding tokens while every window still
# mixes the epoch's random order.
GROUP_WINDOW_BATCHES = 16


def ends_on_loss(sft, window: list[float]) -> bool:
    """Whether training ends at this log point: `sft.stop_loss` is set and a whole window of `sft.log_every` losses
    averages below it (a resumed run's first, partial window never ends it)."""
    return sft.stop_loss > 0 and len(window) == sft.log_every and float(np.mean(window)) < sft.stop_loss


def epoch_batches(lengths: list[int], batch_size: int, group_by_length: bool, rng: np.random.Generator
                  ) -> list[np.ndarray]:
    """One epoch's batches of record indices: a random order cut into batches, or, grouping by length, each window
    of the random order sorted by length and cut into batches, the batches then visited in a random order."""
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * GROUP_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        part = order[start:start + window]
        part = part[np.argsort([-lengths[i] for i in part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def update_config(sft) -> UpdateConfig:
    return UpdateConfig(LossConfig(kind="sft", sft_per=sft.per), sft.optim)
