"""Output heads on the decoder's final hidden states: token log-probs (chunked) and a scalar value head.

Training needs log π(token_t | tokens_<t) at every position. Materialising [B, T, V] float32 logits costs
B·T·V·4 bytes (4 × 32K tokens × 152K vocab would be 80 GB), so the vocabulary projection and its log-softmax run
over chunks of the sequence, each rematerialised in the backward pass: memory is one chunk's logits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxagent.models.config import ModelConfig, accumulation_dtype


def output_kernel(params: dict, config: ModelConfig) -> jax.Array:
    """The [D, V] vocabulary projection (the transposed embedding when embeddings are tied)."""
    return params["embedding"].T if config.tie_word_embeddings else params["lm_head"]


def token_logprobs(hidden_BxTxD: jax.Array, kernel_DxV: jax.Array, tokens_BxT: jax.Array, temperature: float = 1.0,
                   chunk: int = 512, dtype: Any = None) -> jax.Array:
    """[B, T] log-softmax(logits / temperature) of each token given the ones before it; position 0 gets 0.

    Hidden state t predicts token t+1; the result is shifted so that entry t scores token t.
    """
    batch, steps, width = hidden_BxTxD.shape
    dtype = dtype or hidden_BxTxD.dtype
    targets = jnp.concatenate([tokens_BxT[:, 1:], jnp.zeros((batch, 1), tokens_BxT.dtype)], axis=1)
    chunk = min(chunk, steps)
    padded = -(-steps // chunk) * chunk
    pad = padded - steps
    hidden = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(batch, padded // chunk, chunk, width)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, padded // chunk, chunk)

    @jax.checkpoint
    def score(h_BxCxD: jax.Array, t_BxC: jax.Array) -> jax.Array:
        logits = jnp.einsum("bcd,dv->bcv", h_BxCxD.astype(dtype), kernel_DxV.astype(dtype),
                            preferred_element_type=accumulation_dtype(dtype)) / temperature
        picked = jnp.take_along_axis(logits, t_BxC[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    scored = jax.lax.map(lambda args: score(*args), (hidden.swapaxes(0, 1), targets.swapaxes(0, 1)))
    next_token_logp = scored.swapaxes(0, 1).reshape(batch, padded)[:, :steps]
    return jnp.concatenate([jnp.zeros((batch, 1), next_token_logp.dtype), next_token_logp[:, :-1]], axis=1)


def init_value_head(config: ModelConfig) -> dict:
    """A linear value head V(h) = h·w + b; starts at the constant 0.5 (the middle of the reward range [0, 1])."""
    dtype = accumulation_dtype(config.param_dtype)  # float32 under a bfloat16 base, as its adapters
    return {"kernel": jnp.zeros((config.hidden_size,), dtype), "bias": jnp.asarray(0.5, dtype)}


def value_estimates(hidden_BxTxD: jax.Array, head: dict) -> jax.Array:
    """[B, T] value of the state after each token."""
    hidden = hidden_BxTxD.astype(accumulation_dtype(hidden_BxTxD.dtype))
    return jnp.einsum("btd,d->bt", hidden, head["kernel"]) + head["bias"]
