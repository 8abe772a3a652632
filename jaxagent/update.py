"""The jitted update step: recompute log-probs, apply the named loss, accumulate micro-batches, clip, AdamW.

One call of the function `make_update_step` returns does one optimizer step on one batch:

1. split the batch into micro-batches and scan over them, summing each one's loss total, count and gradient;
2. divide by the batch's count (so micro-batching is exact), clip the global gradient norm, apply optax AdamW;
3. if the loss or any gradient is not finite, keep the old parameters and optimizer state and count the skip.

With LoRA the trainable tree holds only the adapters (and a value head for PPO); the base weights are a separate,
frozen argument, and the reference policy of KL and DPO terms is those same base weights with LoRA switched off.
The train state is donated, so parameters and optimizer moments are updated in place.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxagent import losses
from jaxagent.models.config import ModelConfig
from jaxagent.models.heads import output_kernel, token_logprobs, value_estimates
from jaxagent.models.lora import LoraConfig
from jaxagent.models.transformer import forward

log = logging.getLogger(__name__)

LOSS_KINDS = ("policy", "sft", "dpo", "bradley_terry")
SCHEDULES = ("constant", "linear", "cosine")


class UpdateConfigError(ValueError):
    """An impossible update configuration; the message names the field and what is valid."""


class NonFiniteError(RuntimeError):
    """Too many update steps in a row had a non-finite loss or gradient; parameters were never overwritten."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping (LOOP: lr 5e-5 constant, weight decay 0.01, clip 1)."""

    lr: float = 5e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0  # for linear/cosine decay
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UpdateConfigError(f"optim.schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.schedule != "constant" and self.total_steps <= 0:
            raise UpdateConfigError(f"optim.schedule={self.schedule!r} needs optim.total_steps > 0")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise UpdateConfigError(f"optim.lr={self.lr} and optim.max_grad_norm={self.max_grad_norm} must be > 0")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which loss and its hyper-parameters (defaults: LOOP)."""

    kind: str = "policy"
    epsilon: float = 0.1
    clip: str = "asymmetric"
    ratio_level: str = "token"
    kl_coef: float = 0.0
    beta: float = 0.1  # DPO and Bradley-Terry temperature
    nll_coef: float = 0.0  # DPO's NLL term on the chosen side
    critic_score: str = "trajectory_mean"
    sft_per: str = "token"
    value_coef: float = 0.0  # PPO with a learned critic: weight of the value loss at step 0 ...
    value_coef_end: float = 0.0  # ... and after `value_coef_steps` (linear in between)
    value_coef_steps: int = 1
    temperature: float = 1.0  # log-probs are of logits / temperature, as the sampler computed them
    logprob_chunk: int = 512

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise UpdateConfigError(f"loss.kind={self.kind!r}; valid: {', '.join(LOSS_KINDS)}")
        if self.clip not in losses.CLIP_MODES:
            raise UpdateConfigError(f"loss.clip={self.clip!r}; valid: {', '.join(losses.CLIP_MODES)}")
        if self.ratio_level not in losses.RATIO_LEVELS:
            raise UpdateConfigError(f"loss.ratio_level={self.ratio_level!r}; valid: {', '.join(losses.RATIO_LEVELS)}")
        if self.critic_score not in losses.CRITIC_SCORES:
            raise UpdateConfigError(
                f"loss.critic_score={self.critic_score!r}; valid: {', '.join(losses.CRITIC_SCORES)}")
        if self.temperature <= 0:
            raise UpdateConfigError(f"loss.temperature={self.temperature} must be > 0")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares with a reference policy."""
        return self.kind in ("dpo", "bradley_terry") or (self.kind == "policy" and self.kl_coef > 0)


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """Everything the update step needs besides the model."""

    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    micro_batches: int = 1
    max_nonfinite_in_row: int = 3

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise UpdateConfigError(f"micro_batches={self.micro_batches} must be >= 1")


class SequenceBatch(NamedTuple):
    """Trajectories for policy-gradient and SFT losses; [N, T] per token, [N] per trajectory."""

    tokens_NxT: jax.Array
    segment_ids_NxT: jax.Array  # 1 on real tokens, 0 on padding
    model_mask_NxT: jax.Array
    turn_index_NxT: jax.Array
    sample_logprobs_NxT: jax.Array  # from the sampler
    old_logprobs_NxT: jax.Array  # recomputed by the learner before the update
    advantages: jax.Array  # [N], or [N, T] per token (PPO)
    weights_N: jax.Array  # 1 = trained on (kept by the filters), 0 = ignored
    returns_NxT: jax.Array | None = None  # PPO value targets
    ref_logprobs_NxT: jax.Array | None = None  # reference policy; computed in the step when None and LoRA is on


class PairBatch(NamedTuple):
    """Chosen/rejected pairs for DPO and the Bradley-Terry critic: [P, 2, T] with index 0 chosen, 1 rejected."""

    tokens_Px2xT: jax.Array
    segment_ids_Px2xT: jax.Array
    model_mask_Px2xT: jax.Array
    turn_index_Px2xT: jax.Array
    valid_P: jax.Array
    ref_logprobs_Px2xT: jax.Array | None = None


class TrainState(NamedTuple):
    """What the update step changes: trainable leaves, optimizer state, and counters."""

    trainable: dict  # {"params": ...} for full training, {"lora": ...} with LoRA; plus "value_head" for PPO
    opt_state: Any
    step: jax.Array
    nonfinite_in_row: jax.Array
    nonfinite_total: jax.Array


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the configured schedule."""
    if config.schedule == "constant":
        decay = optax.constant_schedule(config.lr)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(config.lr, 0.0, max(config.total_steps - config.warmup_steps, 1))
    else:
        decay = optax.cosine_decay_schedule(config.lr, max(config.total_steps - config.warmup_steps, 1))
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


def sequence_logprobs(params: dict, config: ModelConfig, tokens_NxT: jax.Array, segment_ids_NxT: jax.Array,
                      lora_params: dict | None, lora: LoraConfig | None, temperature: float, chunk: int,
                      value_head: dict | None = None, dropout_rng: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array | None]:
    """Per-token log-probs [N, T] (0 at position 0 and on padding) and, with a value head, values [N, T]."""
    out = forward(params, config, tokens_NxT, segment_ids_BxT=segment_ids_NxT, lora_params=lora_params, lora=lora,
                  dropout_rng=dropout_rng, with_logits=False)
    logp = token_logprobs(out.hidden_BxTxD, output_kernel(params, config), tokens_NxT, temperature, chunk,
                          dtype=config.dtype)
    logp = jnp.where(segment_ids_NxT != 0, logp, 0.0)
    values = value_estimates(out.hidden_BxTxD, value_head) if value_head is not None else None
    return logp, values


@dataclasses.dataclass(frozen=True)
class UpdateStep:
    """`step(state, frozen, batch, rng) -> (state, metrics)`; `gradients(trainable, frozen, batch, step, rng)` is
    the same loss and gradient computation without the optimizer (for diagnostics and tests)."""

    step: Callable
    gradients: Callable

    def __call__(self, state: TrainState, frozen: dict, batch, rng: jax.Array):
        return self.step(state, frozen, batch, rng)


def make_update_step(model: ModelConfig, config: UpdateConfig, lora: LoraConfig | None = None,
                     donate: bool = True) -> UpdateStep:
    """Build the jitted `step(state, frozen, batch, rng) -> (state, metrics)`.

    `frozen` is {"params": base weights} with LoRA and {} without. `batch` is a SequenceBatch (policy, sft) or a
    PairBatch (dpo, bradley_terry). `rng` drives LoRA dropout.
    """
    optimizer = make_optimizer(config.optim)
    loss_config = config.loss
    bounds = losses.clip_bounds(loss_config.epsilon, loss_config.clip)

    def split_params(trainable: dict, frozen: dict) -> tuple[dict, dict | None]:
        params = trainable["params"] if "params" in trainable else frozen["params"]
        return params, trainable.get("lora")

    def reference(frozen: dict, tokens, segments, given):
        if given is not None:
            return given
        if lora is None or "params" not in frozen:
            raise UpdateConfigError(f"loss.kind={loss_config.kind!r} needs reference log-probs: put them in the "
                                    "batch, or train with LoRA (the base weights are then the reference)")
        ref, _ = sequence_logprobs(frozen["params"], model, tokens, segments, None, None, loss_config.temperature,
                                   loss_config.logprob_chunk)
        return jax.lax.stop_gradient(ref)

    def loss_fn(trainable: dict, frozen: dict, batch, step, rng):
        params, lora_params = split_params(trainable, frozen)
        dropout = rng if lora is not None and lora.dropout > 0 else None
        if isinstance(batch, PairBatch):
            return pair_loss(params, lora_params, frozen, batch, dropout)
        value_head = trainable.get("value_head")
        logp, values = sequence_logprobs(params, model, batch.tokens_NxT, batch.segment_ids_NxT, lora_params, lora,
                                         loss_config.temperature, loss_config.logprob_chunk, value_head, dropout)
        if loss_config.kind == "sft":
            total, count = losses.sft_loss(logp, batch.model_mask_NxT, batch.weights_N, loss_config.sft_per)
        else:
            ref = None
            if loss_config.kl_coef:
                ref = reference(frozen, batch.tokens_NxT, batch.segment_ids_NxT, batch.ref_logprobs_NxT)
            total, count = losses.policy_loss(
                logp, batch.old_logprobs_NxT, batch.model_mask_NxT, batch.advantages, batch.turn_index_NxT,
                epsilon=loss_config.epsilon, clip=loss_config.clip, ratio_level=loss_config.ratio_level,
                ref_logp_NxT=ref, kl_coef=loss_config.kl_coef, valid_N=batch.weights_N)
            if value_head is not None and batch.returns_NxT is not None:
                value_total, _ = losses.value_loss(values, batch.returns_NxT, batch.model_mask_NxT, batch.weights_N)
                total = total + value_coef(step) * value_total
        return total, (count, jax.lax.stop_gradient(logp))

    def pair_loss(params, lora_params, frozen, batch: PairBatch, dropout):
        pairs, _, steps = batch.tokens_Px2xT.shape
        flat = lambda x: x.reshape(pairs * 2, steps)  # noqa: E731
        logp, _ = sequence_logprobs(params, model, flat(batch.tokens_Px2xT), flat(batch.segment_ids_Px2xT),
                                    lora_params, lora, loss_config.temperature, loss_config.logprob_chunk,
                                    dropout_rng=dropout)
        ref = reference(frozen, flat(batch.tokens_Px2xT), flat(batch.segment_ids_Px2xT),
                        None if batch.ref_logprobs_Px2xT is None else flat(batch.ref_logprobs_Px2xT))
        logp, ref = logp.reshape(pairs, 2, steps), ref.reshape(pairs, 2, steps)
        mask, turns = batch.model_mask_Px2xT, batch.turn_index_Px2xT
        if loss_config.kind == "dpo":
            total, count = losses.dpo_loss(logp[:, 0], mask[:, 0], ref[:, 0], logp[:, 1], mask[:, 1], ref[:, 1],
                                           beta=loss_config.beta, nll_coef=loss_config.nll_coef,
                                           valid_P=batch.valid_P)
        else:
            total, count = losses.bradley_terry_loss(logp[:, 0], ref[:, 0], mask[:, 0], logp[:, 1], ref[:, 1],
                                                     mask[:, 1], turns[:, 0], turns[:, 1], beta=loss_config.beta,
                                                     score=loss_config.critic_score, valid_P=batch.valid_P)
        return total, (count, jax.lax.stop_gradient(logp.reshape(pairs * 2, steps)))

    def value_coef(step):
        start, end = loss_config.value_coef, loss_config.value_coef_end
        frac = jnp.clip(step / max(loss_config.value_coef_steps, 1), 0.0, 1.0)
        return start + (end - start) * frac

    def gradients(trainable: dict, frozen: dict, batch, step, rng: jax.Array):
        """Loss, gradient (of total / count over the whole batch) and statistics, micro-batch by micro-batch."""
        micro = _split(batch, config.micro_batches)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry, inputs):
            grads_sum, total_sum, count_sum = carry
            micro_batch, key = inputs
            (total, (count, logp)), grads = grad_fn(trainable, frozen, micro_batch, step, key)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            stats = _token_stats(micro_batch, logp, bounds)
            return (grads_sum, total_sum + total, count_sum + count), stats

        keys = jax.random.split(rng, config.micro_batches)
        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads, total, count), stats = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (micro, keys))
        denominator = jnp.maximum(count, 1.0)
        return total / denominator, jax.tree.map(lambda g: g / denominator, grads), count, stats

    def step_fn(state: TrainState, frozen: dict, batch, rng: jax.Array):
        loss, grads, count, stats = gradients(state.trainable, frozen, batch, state.step, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite & (count > 0)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        new_trainable = optax.apply_updates(state.trainable, updates)
        # A non-finite step changes nothing: parameters and moments are never overwritten with NaNs.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            keep(new_trainable, state.trainable), keep(new_opt_state, state.opt_state),
            state.step + apply.astype(jnp.int32),
            jnp.where(finite, 0, state.nonfinite_in_row + 1), state.nonfinite_total + (~finite).astype(jnp.int32))
        return new_state, _finish_stats(stats, loss, grad_norm, count, finite)

    return UpdateStep(jax.jit(step_fn, donate_argnums=(0,) if donate else ()), jax.jit(gradients))


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
    """Reshape every [N, ...] leaf to [parts, N / parts, ...] for the micro-batch scan."""
    leaves = [x for x in jax.tree.leaves(batch)]
    n = leaves[0].shape[0]
    if n % parts:
        raise UpdateConfigError(f"batch of {n} rows does not split into micro_batches={parts}; use a divisor of {n}")
    return jax.tree.map(lambda x: x.reshape(parts, n // parts, *x.shape[1:]), batch)


def _token_stats(batch, logp: jax.Array, bounds: tuple[float, float]) -> dict:
    """Sums and extremes over model tokens, for the metrics (combined across micro-batches afterwards)."""
    if isinstance(batch, PairBatch):
        mask = batch.model_mask_Px2xT.reshape(logp.shape).astype(bool)
        return {"model_tokens": jnp.sum(mask), "tokens": jnp.sum(batch.segment_ids_Px2xT != 0)}
    mask = batch.model_mask_NxT.astype(bool) & (batch.weights_N[:, None] > 0)
    log_ratio = logp - batch.old_logprobs_NxT
    ratio = jnp.exp(log_ratio)
    mismatch = jnp.abs(batch.sample_logprobs_NxT - batch.old_logprobs_NxT)
    return {
        "model_tokens": jnp.sum(mask),
        "tokens": jnp.sum(batch.segment_ids_NxT != 0),
        "trajectories": jnp.sum(batch.weights_N > 0),
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
