"""What the update step minimises: one loss-function factory per kind, from a `LossConfig` to

    loss_fn(trainable, frozen, batch, step, rng) -> (total, (count, logp))

Each entry of `LOSSES` pairs a scorer (how the model reads the batch: per-token log-probs of sequences or of
chosen/rejected pairs, the reference policy's log-probs when the loss needs them, a value head's estimates) with a
term (the loss of `jaxagent.losses` applied to those scores). Every term returns `(total, count)`: the loss is
total / count, kept apart so that micro-batches accumulate exactly.

Adding a loss is one function and one entry. For example a length-normalised DPO:

    def dpo_mean_term(config: LossConfig) -> Term:
        def term(scored: Scored, batch: PairBatch, step: jax.Array):
            return losses.dpo_loss(..., beta=config.beta)   # with per-token means instead of sums
        return term

    LOSSES["dpo_mean"] = Loss(score_pairs, dpo_mean_term)     # and its name in jaxagent.choices.LOSS_KINDS

The reference policy of KL and DPO terms: log-probs carried by the batch when present, else the frozen base weights
with LoRA switched off.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxagent import choices, losses
from jaxagent.errors import UserError, check_choice, lookup
from jaxagent.models.config import ModelConfig
from jaxagent.models.heads import output_kernel, token_logprobs, value_estimates
from jaxagent.models.lora import LoraConfig
from jaxagent.models.transformer import forward
from jaxagent.trajectory import PairBatch, SequenceBatch


class UpdateConfigError(UserError):
    """An impossible update configuration; the message names the field and what is valid."""


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
    # "count": a batch's loss is its mean over the units it holds (trajectories, tokens, pairs). "rows": the sum
    # over its units divided by the batch's rows, i.e. the configured minibatch size, as LOOP's reference code
    # does, so a short last minibatch (6 kept rollouts of 32) weighs 6/32 of a full one.
    denominator: str = "count"

    def __post_init__(self) -> None:
        check_choice(self.kind, choices.LOSS_KINDS, "loss.kind", UpdateConfigError)
        check_choice(self.clip, choices.CLIP_MODES, "loss.clip", UpdateConfigError)
        check_choice(self.ratio_level, choices.RATIO_LEVELS, "loss.ratio_level", UpdateConfigError)
        check_choice(self.critic_score, choices.CRITIC_SCORES, "loss.critic_score", UpdateConfigError)
        check_choice(self.sft_per, choices.SFT_NORMALISATIONS, "loss.sft_per", UpdateConfigError)
        check_choice(self.denominator, choices.DENOMINATORS, "loss.denominator", UpdateConfigError)
        if self.temperature <= 0:
            raise UpdateConfigError(f"loss.temperature={self.temperature} must be > 0")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares with a reference policy."""
        return self.kind in ("dpo", "bradley_terry") or (self.kind == "policy" and self.kl_coef > 0)


class Scored(NamedTuple):
    """The model's reading of a batch: log-probs [N, T] (sequences) or [P, 2, T] (pairs), the reference policy's
    log-probs (same shape; None when the loss needs none) and a value head's estimates [N, T] (None without one)."""

    logp: jax.Array
    ref: jax.Array | None
    values: jax.Array | None


Scorer = Callable[[dict, dict, Any, jax.Array], Scored]  # (trainable, frozen, batch, rng) -> Scored
Term = Callable[[Scored, Any, jax.Array], tuple[jax.Array, jax.Array]]  # (scored, batch, step) -> (total, count)
LossFn = Callable[[dict, dict, Any, jax.Array, jax.Array], tuple[jax.Array, tuple[jax.Array, jax.Array]]]


# Jitted (inlined when traced by a caller) for the same reason as `forward`: one program when called eagerly.
@functools.partial(jax.jit, static_argnames=("config", "lora", "temperature", "chunk"), inline=True)
def sequence_logprobs(params: dict, config: ModelConfig, tokens_NxT: jax.Array, segment_ids_NxT: jax.Array,
                      lora_params: dict | None, lora: LoraConfig | None, temperature: float, chunk: int,
                      value_head: dict | None = None, dropout_rng: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array | None]:
    """Per-token log-probs [N, T] (0 at position 0 and on padding) and, with a value head, values [N, T]."""
    out = forward(params, config, tokens_NxT, segment_ids_BxT=segment_ids_NxT, lora_params=lora_params, lora=lora,
                  dropout_rng=dropout_rng, with_logits=False)
    logp = token_logprobs(out.hidden_BxTxD, output_kernel(params, config), tokens_NxT, temperature, chunk,
                          dtype=config.dtype)
    # A segment's first token has nothing before it to be predicted from (in a packed row, the previous token is
    # another trajectory's): 0, as at position 0.
    previous = jnp.pad(segment_ids_NxT[:, :-1], ((0, 0), (1, 0)))
    logp = jnp.where((segment_ids_NxT != 0) & (segment_ids_NxT == previous), logp, 0.0)
    values = value_estimates(out.hidden_BxTxD, value_head) if value_head is not None else None
    return logp, values


# ---- scorers ------------------------------------------------------------------------------------------------------

def _policy_inputs(trainable: dict, frozen: dict, rng: jax.Array, lora: LoraConfig | None
                   ) -> tuple[dict, dict | None, jax.Array | None]:
    """(base parameters, LoRA adapters or None, LoRA dropout key or None) of the policy being trained."""
    params = trainable["params"] if "params" in trainable else frozen["params"]
    return params, trainable.get("lora"), rng if lora is not None and lora.dropout > 0 else None


def _reference_fn(model: ModelConfig, config: LossConfig, lora: LoraConfig | None) -> Callable:
    """`reference(frozen, tokens, segments, given)`: the batch's reference log-probs, or the base model's."""
    def reference(frozen: dict, tokens: jax.Array, segments: jax.Array, given: jax.Array | None) -> jax.Array:
        if given is not None:
            return given
        if lora is None or "params" not in frozen:
            raise UpdateConfigError(f"loss.kind={config.kind!r} needs reference log-probs: put them in the batch, "
                                    "or train with LoRA (the base weights are then the reference)")
        ref, _ = sequence_logprobs(frozen["params"], model, tokens, segments, None, None, config.temperature,
                                   config.logprob_chunk)
        return jax.lax.stop_gradient(ref)
    return reference


def score_sequences(model: ModelConfig, config: LossConfig, lora: LoraConfig | None) -> Scorer:
    """Log-probs (and value estimates, with a value head) of a SequenceBatch's rows."""
    reference = _reference_fn(model, config, lora)

    def score(trainable: dict, frozen: dict, batch: SequenceBatch, rng: jax.Array) -> Scored:
        params, lora_params, dropout = _policy_inputs(trainable, frozen, rng, lora)
        tokens, segments, unpack = _model_rows(batch)
        logp, values = sequence_logprobs(params, model, tokens, segments, lora_params, lora, config.temperature,
                                         config.logprob_chunk, trainable.get("value_head"), dropout)
        ref = None
        if config.needs_reference:
            ref = batch.ref_logprobs_NxT
            if ref is None:
                ref = unpack(reference(frozen, tokens, segments, None))
        return Scored(unpack(logp), ref, None if values is None else unpack(values))
    return score


def _model_rows(batch: SequenceBatch) -> tuple[jax.Array, jax.Array, Callable[[jax.Array], jax.Array]]:
    """(tokens, segment ids) the model runs on, and the map from its per-token results back to [N, T]: the batch's
    own rows, or its packed rows and a gather by `pack_index_NxT` (0 on padding)."""
    if batch.packed_tokens_RxL is None:
        return batch.tokens_NxT, batch.segment_ids_NxT, lambda x: x

    def unpack(x_RxL: jax.Array) -> jax.Array:
        gathered = jnp.take(x_RxL.reshape(-1), batch.pack_index_NxT, axis=0)
        return jnp.where(batch.segment_ids_NxT != 0, gathered, 0.0)
    return batch.packed_tokens_RxL, batch.packed_segment_ids_RxL, unpack


def score_pairs(model: ModelConfig, config: LossConfig, lora: LoraConfig | None) -> Scorer:
    """Log-probs [P, 2, T] of a PairBatch's chosen and rejected sides, and the reference policy's."""
    reference = _reference_fn(model, config, lora)

    def score(trainable: dict, frozen: dict, batch: PairBatch, rng: jax.Array) -> Scored:
        params, lora_params, dropout = _policy_inputs(trainable, frozen, rng, lora)
        pairs, _, steps = batch.tokens_Px2xT.shape
        flat = lambda x: x.reshape(pairs * 2, steps)  # noqa: E731
        logp, _ = sequence_logprobs(params, model, flat(batch.tokens_Px2xT), flat(batch.segment_ids_Px2xT),
                                    lora_params, lora, config.temperature, config.logprob_chunk, dropout_rng=dropout)
        ref = reference(frozen, flat(batch.tokens_Px2xT), flat(batch.segment_ids_Px2xT),
                        None if batch.ref_logprobs_Px2xT is None else flat(batch.ref_logprobs_Px2xT))
        return Scored(logp.reshape(pairs, 2, steps), ref.reshape(pairs, 2, steps), None)
    return score


# ---- terms --------------------------------------------------------------------------------------------------------

def policy_term(config: LossConfig) -> Term:
    """LOOP / GRPO / PPO / REINFORCE: the clipped policy-gradient loss (plus GRPO's KL when kl_coef > 0)."""
    def term(scored: Scored, batch: SequenceBatch, step: jax.Array):
        return losses.policy_loss(scored.logp, batch.old_logprobs_NxT, batch.model_mask_NxT, batch.advantages,
                                  batch.turn_index_NxT, epsilon=config.epsilon, clip=config.clip,
                                  ratio_level=config.ratio_level, ref_logp_NxT=scored.ref, kl_coef=config.kl_coef,
                                  valid_N=batch.weights_N)
    return term


def value_term(config: LossConfig) -> Term:
    """PPO's value loss, weighted by a coefficient that decays linearly over `value_coef_steps` optimizer steps."""
    def term(scored: Scored, batch: SequenceBatch, step: jax.Array):
        total, count = losses.value_loss(scored.values, batch.returns_NxT, batch.model_mask_NxT, batch.weights_N)
        start, end = config.value_coef, config.value_coef_end
        frac = jnp.clip(step / max(config.value_coef_steps, 1), 0.0, 1.0)
        return (start + (end - start) * frac) * total, count
    return term


def sft_term(config: LossConfig) -> Term:
    """Behaviour cloning: NLL of the model tokens of kept rows."""
    def term(scored: Scored, batch: SequenceBatch, step: jax.Array):
        return losses.sft_loss(scored.logp, batch.model_mask_NxT, batch.weights_N, config.sft_per)
    return term


def dpo_term(config: LossConfig) -> Term:
    """DPO on chosen/rejected pairs, sequence log-probs summed over agent tokens (+ an optional NLL term)."""
    def term(scored: Scored, batch: PairBatch, step: jax.Array):
        logp, ref, mask = scored.logp, scored.ref, batch.model_mask_Px2xT
        return losses.dpo_loss(logp[:, 0], mask[:, 0], ref[:, 0], logp[:, 1], mask[:, 1], ref[:, 1],
                               beta=config.beta, nll_coef=config.nll_coef, valid_P=batch.valid_P)
    return term


def bradley_terry_term(config: LossConfig) -> Term:
    """SWEET-RL's critic loss: Bradley-Terry on the critic's scores of the chosen and rejected trajectories."""
    def term(scored: Scored, batch: PairBatch, step: jax.Array):
        logp, ref, mask, turns = scored.logp, scored.ref, batch.model_mask_Px2xT, batch.turn_index_Px2xT
        return losses.bradley_terry_loss(logp[:, 0], ref[:, 0], mask[:, 0], logp[:, 1], ref[:, 1], mask[:, 1],
                                         turns[:, 0], turns[:, 1], beta=config.beta, score=config.critic_score,
                                         valid_P=batch.valid_P)
    return term


class Loss(NamedTuple):
    """A loss kind: how the model reads the batch, and the term computed from that reading."""

    scorer: Callable[[ModelConfig, LossConfig, LoraConfig | None], Scorer]
    term: Callable[[LossConfig], Term]


# Losses by name (`loss.kind`; "value" is the term a value head adds beside the policy loss).
LOSSES: dict[str, Loss] = {
    "policy": Loss(score_sequences, policy_term),
    "value": Loss(score_sequences, value_term),
    "sft": Loss(score_sequences, sft_term),
    "dpo": Loss(score_pairs, dpo_term),
    "bradley_terry": Loss(score_pairs, bradley_terry_term),
}


def get_loss(name: str) -> Loss:
    """The loss called `name`."""
    return lookup(LOSSES, name, "loss")


def make_loss_fn(model: ModelConfig, config: LossConfig, lora: LoraConfig | None = None) -> LossFn:
    """`loss_fn(trainable, frozen, batch, step, rng) -> (total, (count, logp))` for `config.kind`; with a value
    head in `trainable` (PPO) and value targets in the batch, the value term is added."""
    loss = get_loss(config.kind)
    score, term, value = loss.scorer(model, config, lora), loss.term(config), value_term(config)

    def loss_fn(trainable: dict, frozen: dict, batch, step: jax.Array, rng: jax.Array):
        scored = score(trainable, frozen, batch, rng)
        total, count = term(scored, batch, step)
        if scored.values is not None and batch.returns_NxT is not None:
            total = total + value(scored, batch, step)[0]
        logp = scored.logp.reshape(-1, scored.logp.shape[-1])  # pairs: [2P, T]
        return total, (count, jax.lax.stop_gradient(logp))
    return loss_fn
