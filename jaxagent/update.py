"""The jitted update step: score the batch, apply the configured loss, accumulate micro-batches, clip, AdamW.

One call of the function `make_update_step` returns does one optimizer step on one batch:

1. split the batch into micro-batches and scan over them, summing each one's loss total, count and gradient
   (the loss comes from `jaxagent.objectives`, one factory per `loss.kind`);
2. divide by the batch's count (so micro-batching is exact), clip the global gradient norm, apply optax AdamW;
3. if the loss or any gradient is not finite, keep the old parameters and optimizer state and count the skip.

With LoRA the trainable tree holds only the adapters (and a value head for PPO); the base weights are a separate,
frozen argument, and the reference policy of KL and DPO terms is those same base weights with LoRA switched off.
The train state is donated, so parameters and optimizer moments are updated in place; on a mesh the step is jitted
with the train state's shardings in and out (`StepShardings`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxagent import losses
from jaxagent.config import OptimConfig
from jaxagent.errors import lookup
from jaxagent.models.config import ModelConfig
from jaxagent.models.lora import LoraConfig
from jaxagent.objectives import LossConfig, LossFn, UpdateConfigError, make_loss_fn, sequence_logprobs
from jaxagent.trajectory import PairBatch, SequenceBatch

__all__ = ["LossConfig", "NonFiniteError", "OptimConfig", "PairBatch", "SequenceBatch", "StepShardings", "TrainState",
           "UpdateConfig", "UpdateConfigError", "UpdateStep", "check_nonfinite", "init_train_state",
           "make_optimizer", "make_update_step", "sequence_logprobs"]

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many update steps in a row had a non-finite loss or gradient; parameters were never overwritten."""


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """Everything the update step needs besides the model."""

    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    micro_batches: int = 1
    max_nonfinite_in_row: int = 3
    # LOOP's runaway guard: a step whose minibatch has |KL estimate| > kl_stop to the policy that sampled it is not
    # applied (the caller then ends the iteration's updates); 0 = off. The estimate is -mean over the kept rows of
    # the trajectory log-ratio, sum over model tokens of (log π_new - log π_old), as apple/ml-loop computes it.
    kl_stop: float = 0.0

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise UpdateConfigError(f"micro_batches={self.micro_batches} must be >= 1")


class TrainState(NamedTuple):
    """What the update step changes: trainable leaves, optimizer state, and counters."""

    trainable: dict  # {"params": ...} for full training, {"lora": ...} with LoRA; plus "value_head" for PPO
    opt_state: Any
    step: jax.Array
    nonfinite_in_row: jax.Array
    nonfinite_total: jax.Array


# Learning-rate schedules after the warm-up, by name (`optim.schedule`).
SCHEDULES: dict[str, Callable[[OptimConfig], optax.Schedule]] = {
    "constant": lambda c: optax.constant_schedule(c.lr),
    "linear": lambda c: optax.linear_schedule(c.lr, 0.0, max(c.total_steps - c.warmup_steps, 1)),
    "cosine": lambda c: optax.cosine_decay_schedule(c.lr, max(c.total_steps - c.warmup_steps, 1)),
}


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the configured schedule."""
    decay = lookup(SCHEDULES, config.schedule, "schedule")(config)
    schedule = decay if not config.warmup_steps else optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, config.warmup_steps), decay], [config.warmup_steps])
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                   weight_decay=config.weight_decay))


def init_train_state(trainable: dict, config: UpdateConfig) -> TrainState:
    """A fresh train state for `trainable` (the optimizer sees exactly these leaves)."""
    # Three distinct buffers: the state is donated, and one buffer cannot be donated twice.
    counters = [jnp.zeros((), jnp.int32) for _ in range(3)]
    return TrainState(trainable, make_optimizer(config.optim).init(trainable), *counters)


@dataclasses.dataclass(frozen=True)
class UpdateStep:
    """`step(state, frozen, batch, rng) -> (state, metrics)`; `gradients(trainable, frozen, batch, step, rng)` is
    the same loss and gradient computation without the optimizer (for diagnostics and tests)."""

    step: Callable
    gradients: Callable

    def __call__(self, state: TrainState, frozen: dict, batch, rng: jax.Array):
        return self.step(state, frozen, batch, rng)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the step's train state and frozen weights live on a mesh (`train_state_shardings`); the state comes
    out where it went in. The batch keeps the placement it arrives with."""

    state: TrainState
    frozen: Any


def make_update_step(model: ModelConfig, config: UpdateConfig, lora: LoraConfig | None = None,
                     donate: bool = True, shardings: StepShardings | None = None) -> UpdateStep:
    """Build the jitted `step(state, frozen, batch, rng) -> (state, metrics)`.

    `frozen` is {"params": base weights} with LoRA and {} without. `batch` is a SequenceBatch (policy, sft) or a
    PairBatch (dpo, bradley_terry). `rng` drives LoRA dropout.
    """
    gradients = _gradients_fn(make_loss_fn(model, config.loss, lora), config)
    step_fn = _step_fn(gradients, make_optimizer(config.optim), config.kl_stop)
    jit_args: dict = {"donate_argnames": ("state",) if donate else ()}
    if shardings is not None:
        jit_args.update(in_shardings=(shardings.state, shardings.frozen, None, None),
                        out_shardings=(shardings.state, None))
        mesh = jax.tree.leaves(shardings.state)[0].mesh
        step_fn, gradients = (_on_mesh(fn, mesh) for fn in (step_fn, gradients))
    return UpdateStep(jax.jit(step_fn, **jit_args), jax.jit(gradients))


def _on_mesh(fn: Callable, mesh: Any) -> Callable:
    """`fn` traced with the training rules' activation placement on `mesh` (sequence-parallel layer inputs)."""
    from jaxagent.models.transformer import activation_placement
    from jaxagent.sharding import activation_placer

    @functools.wraps(fn)
    def traced(*args):
        with activation_placement(activation_placer(mesh)):
            return fn(*args)
    return traced


def _gradients_fn(loss_fn: LossFn, config: UpdateConfig) -> Callable:
    """`gradients(trainable, frozen, batch, step, rng) -> (loss, gradient, count, statistics)`: the loss and the
    gradient of total / count over the whole batch, micro-batch by micro-batch."""
    bounds = losses.clip_bounds(config.loss.epsilon, config.loss.clip)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(trainable: dict, frozen: dict, batch, step, rng: jax.Array):
        def accumulate(carry, inputs):
            grads_sum, total_sum, count_sum = carry
            micro_batch, key = inputs
            (total, (count, logp)), grads = grad_fn(trainable, frozen, micro_batch, step, key)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            stats = _token_stats(micro_batch, logp, bounds)
            return (grads_sum, total_sum + total, count_sum + count), stats

        micro = _split(batch, config.micro_batches)
        keys = jax.random.split(rng, config.micro_batches)
        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads, total, count), stats = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (micro, keys))
        rows = jax.tree.leaves(batch)[0].shape[0]
        denominator = jnp.maximum(count, 1.0) if config.loss.denominator == "count" else float(rows)
        return total / denominator, jax.tree.map(lambda g: g / denominator, grads), count, stats
    return gradients


def _step_fn(gradients: Callable, optimizer: optax.GradientTransformation, kl_stop: float) -> Callable:
    """`step(state, frozen, batch, rng) -> (state, metrics)`: one optimizer step that a non-finite loss or
    gradient skips (parameters and moments are never overwritten with NaNs), as does the KL guard."""
    def step(state: TrainState, frozen: dict, batch, rng: jax.Array):
        loss, grads, count, stats = gradients(state.trainable, frozen, batch, state.step, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        high_kl = _high_kl(stats, kl_stop)
        apply = finite & (count > 0) & ~high_kl
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        new_trainable = optax.apply_updates(state.trainable, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            keep(new_trainable, state.trainable), keep(new_opt_state, state.opt_state),
            state.step + apply.astype(jnp.int32),
            jnp.where(finite, 0, state.nonfinite_in_row + 1), state.nonfinite_total + (~finite).astype(jnp.int32))
        return new_state, {**_finish_stats(stats, loss, grad_norm, count, finite), "high_kl": high_kl}
    return step


def _high_kl(stats: dict, kl_stop: float) -> jax.Array:
    """Whether the minibatch's trajectory-level KL estimate is past the guard (never, with kl_stop 0)."""
    if not kl_stop or "log_ratio_sum" not in stats:
        return jnp.asarray(False)
    kl = -jnp.sum(stats["log_ratio_sum"]) / jnp.maximum(jnp.sum(stats["trajectories"]), 1)
    return jnp.abs(kl) > kl_stop


def check_nonfinite(state: TrainState, metrics: dict, limit: int) -> None:
    """Log a skipped step; raise NonFiniteError after `limit` non-finite steps in a row."""
    if bool(metrics["skipped_nonfinite"]):
        in_row = int(state.nonfinite_in_row)
        log.warning("update step skipped: non-finite loss or gradient (%d in a row, %d in total)", in_row,
                    int(state.nonfinite_total))
        if in_row >= limit:
            raise NonFiniteError(f"{in_row} update steps in a row had a non-finite loss or gradient (limit "
                                 f"max_nonfinite_in_row={limit}); stopping with the last finite parameters")


def _split(batch, parts: int):
    """Reshape every [N, ...] leaf to [parts, N / parts, ...] for the micro-batch scan (packed rows [R, L] likewise:
    each micro-batch is packed onto its own R / parts rows)."""
    for x in jax.tree.leaves(batch):
        if x.shape[0] % parts:
            raise UpdateConfigError(f"batch of {x.shape[0]} rows does not split into micro_batches={parts}; use a "
                                    f"divisor of {x.shape[0]}")
    return jax.tree.map(lambda x: x.reshape(parts, x.shape[0] // parts, *x.shape[1:]), batch)


def _token_stats(batch, logp: jax.Array, bounds: tuple[float, float]) -> dict:
    """Sums and extremes over model tokens, for the metrics (combined across micro-batches afterwards)."""
    if isinstance(batch, PairBatch):
        mask = batch.model_mask_Px2xT.reshape(logp.shape).astype(bool)
        return {"model_tokens": jnp.sum(mask), "tokens": jnp.sum(batch.segment_ids_Px2xT != 0)}
    mask = batch.model_mask_NxT.astype(bool) & (batch.weights_N[:, None] > 0)
    log_ratio = jnp.where(mask, logp - batch.old_logprobs_NxT, 0.0)  # never exp() an environment token's ratio
    ratio = jnp.exp(log_ratio)
    mismatch = jnp.abs(batch.sample_logprobs_NxT - batch.old_logprobs_NxT)
    return {
        "model_tokens": jnp.sum(mask),
        "tokens": jnp.sum(batch.segment_ids_NxT != 0),
        "trajectories": jnp.sum(batch.weights_N > 0),
        "log_ratio_sum": jnp.sum(log_ratio),  # the kept rows' trajectory log-ratios, summed
        "ratio_sum": jnp.sum(jnp.where(mask, ratio, 0.0)),
        "ratio_min": jnp.min(jnp.where(mask, ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(mask, ratio, -jnp.inf)),
        "kl_sum": jnp.sum(jnp.where(mask, ratio - 1.0 - log_ratio, 0.0)),  # k3 estimate of KL(old || new)
        "mismatch_sum": jnp.sum(jnp.where(mask, mismatch, 0.0)),
        "mismatch_max": jnp.max(jnp.where(mask, mismatch, 0.0)),
        "ratio_outside": jnp.sum(mask & ((ratio > 1.0 + 1e-6) | (ratio < 1.0 - 1e-6))),
        "clipped": _clipped_tokens(batch, ratio, mask, bounds),
    }


def _clipped_tokens(batch: SequenceBatch, ratio: jax.Array, mask: jax.Array, bounds: tuple[float, float]
                    ) -> jax.Array:
    """Tokens whose ratio is past the bound on the side where clipping removes the gradient."""
    low, high = bounds
    adv = batch.advantages if batch.advantages.ndim == 2 else batch.advantages[:, None]
    clipped = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
    return jnp.sum(mask & clipped)


def _finish_stats(stats: dict, loss, grad_norm, count, finite) -> dict:
    """Combine per-micro-batch statistics into the step's metrics."""
    model_tokens = jnp.sum(stats["model_tokens"])
    denom = jnp.maximum(model_tokens, 1)
    metrics = {"loss": loss, "grad_norm": grad_norm, "loss_count": count, "model_tokens": model_tokens,
               "tokens": jnp.sum(stats["tokens"]), "skipped_nonfinite": ~finite}
    if "ratio_sum" in stats:
        metrics.update(
            trajectories=jnp.sum(stats["trajectories"]),
            ratio_mean=jnp.sum(stats["ratio_sum"]) / denom,
            ratio_min=jnp.min(stats["ratio_min"]),
            ratio_max=jnp.max(stats["ratio_max"]),
            approx_kl=jnp.sum(stats["kl_sum"]) / denom,
            trajectory_kl=-jnp.sum(stats["log_ratio_sum"]) / jnp.maximum(jnp.sum(stats["trajectories"]), 1),
            logprob_mismatch_mean=jnp.sum(stats["mismatch_sum"]) / denom,
            logprob_mismatch_max=jnp.max(stats["mismatch_max"]),
            clipped_fraction=jnp.sum(stats["clipped"]) / denom,
        )
    return metrics


def train_state_shardings(state: TrainState, model: ModelConfig, mesh: Any, config: UpdateConfig,
                          lora: LoraConfig | None = None) -> TrainState:
    """Where each leaf of a train state lives on `mesh` under the training rules: trainable leaves as their
    parameters, optimizer moments as the parameters they track, counters and the value head replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxagent.sharding import TRAIN_RULES, param_shardings

    params_sh, lora_sh = param_shardings(model, mesh, TRAIN_RULES, lora)
    replicated = NamedSharding(mesh, PartitionSpec())
    trainable_sh = {}
    for name, subtree in state.trainable.items():
        if name == "params":
            trainable_sh[name] = params_sh
        elif name == "lora":
            trainable_sh[name] = lora_sh
        else:
            trainable_sh[name] = jax.tree.map(lambda _: replicated, subtree)
    opt_sh = optax.tree_map_params(make_optimizer(config.optim), lambda _, sharding: sharding, state.opt_state,
                                   trainable_sh, transform_non_params=lambda _: replicated)
    return TrainState(trainable_sh, opt_sh, replicated, replicated, replicated)


def batch_shardings(batch, mesh: Any):
    """Every batch leaf split along its leading (batch) axis over data and fsdp, when they divide it."""
    from jaxagent.sharding import TRAIN_RULES, sharding_for

    return jax.tree.map(lambda x: sharding_for(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, TRAIN_RULES),
                        batch)
