"""The decoder: one Flax module for Qwen2/2.5, Llama 2/3/3.x and Qwen3, stacked with `nn.scan` over layers.

Parameters are a plain pytree (`{"params": ...}` for the base model, `{"lora": ...}` for adapters) and the forward is
a pure function of them. Every parameter is created with logical axis names (embed, heads, kv_heads, head_dim, mlp,
vocab, layers, lora_rank) that `param_axes` returns, so a mesh can be mapped onto them without touching this file.

Shapes in names: B batch, T new tokens, S cache slots, D hidden, H query heads, K kv heads, G = H / K, Dh head dim,
F mlp width, V vocab, L layers.

Masking is by segment ids: token t may attend to key s when both carry the same non-zero segment id and s is not
after t. Left padding is segment 0; packed sequences are segments 1, 2, ...; an HF attention_mask (0/1) is a valid
segment-id array. With a KV cache, keys are the cache slots and the new tokens are written at each row's `end`.
Attention never builds a [B, T, S] mask: the kernels (models/attention.py) compare segment ids and slots block by
block; `ModelConfig.attention` picks the blockwise kernel (memory linear in T, the default) or the dense one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxagent.models.attention import KeySource, attention
from jaxagent.models.config import ModelConfig, accumulation_dtype, rope_inverse_frequencies
from jaxagent.models.lora import LoraConfig

_INIT_STD = 0.02  # HF's initializer_range for these families
# LoRA adapters are trained, so they stay float32 whatever the base's dtype: at LOOP's lr 5e-5 most AdamW updates
# of a bfloat16 weight would round away. The adapter's matmuls run in the compute dtype.
ADAPTER_DTYPE = jnp.float32


# How activations are placed on a mesh while a step is traced: `place(x, logical_axes) -> x` (set by
# `activation_placement`; None off a mesh). The model names the axes; the caller's rules map them onto the mesh.
_PLACE_ACTIVATIONS: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("place_activations", default=None)


@contextlib.contextmanager
def activation_placement(place: Callable[[jax.Array, tuple[str, ...]], jax.Array]) -> Iterator[None]:
    """Within this block, traced forwards pin their layer inputs with `place` (see `sharding.activation_placer`)."""
    token = _PLACE_ACTIVATIONS.set(place)
    try:
        yield
    finally:
        _PLACE_ACTIVATIONS.reset(token)


def _placed(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    place = _PLACE_ACTIVATIONS.get()
    return x if place is None else place(x, axes)


class KVCache(NamedTuple):
    """Preallocated keys/values for all layers, with per-slot segment ids and each row's fill level."""

    k_LxBxKxSxDh: jax.Array
    v_LxBxKxSxDh: jax.Array
    segment_ids_BxS: jax.Array  # 0 = empty or padding slot
    end_B: jax.Array  # next slot to write in each row


class DecoderOutput(NamedTuple):
    """Logits (float32) of every new token, the final hidden states, and the updated cache (None without one)."""

    logits_BxTxV: jax.Array | None
    hidden_BxTxD: jax.Array
    cache: KVCache | None


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache of `max_len` slots per row, in the compute dtype unless `dtype` is given."""
    # Slots after heads: attention then contracts contiguous [S, Dh] blocks per (row, kv head) without transposes.
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    dtype = dtype or config.dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch,), jnp.int32))


def _param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...], axes: tuple[str, ...],
           dtype: Any) -> jax.Array:
    # When the model is applied, Flax's `param` traces the initializer (`jax.eval_shape`) only to compare shapes
    # (0.1 of the 1.4 s a micro `tiny` run spends tracing). The stored parameter's shape is compared directly.
    if module.has_variable("params", name):
        value = nn.meta.unbox(module.get_variable("params", name))
        if value.shape != shape:
            where = "/".join((*module.scope.path, name))
            raise ValueError(f"parameter {where} has shape {value.shape}; this model expects {shape}")
        return value
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32 (float64 for a float64 model), scaled by a learned weight in the input's
    dtype (as HF does)."""

    eps: float
    axis_name: str
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        wide = x.astype(accumulation_dtype(x.dtype))
        normed = wide * jax.lax.rsqrt(jnp.mean(wide * wide, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class Projection(nn.Module):
    """A linear map contracting the last `len(in_axes)` dims, with an optional bias and LoRA adapter."""

    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool
    dtype: Any
    param_dtype: Any
    lora: LoraConfig | None = None  # set only when this projection is a LoRA target
    use_lora: bool = True
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_axes)
        in_shape = x.shape[-n_in:]
        kernel = _param(self, "kernel", nn.initializers.normal(_INIT_STD), (*in_shape, *self.out_shape),
                        (*self.in_axes, *self.out_axes), self.param_dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, self.out_shape, self.out_axes, self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora is not None:
            y = y + self._adapter(x, in_shape, contract)
        return y

    def _adapter(self, x: jax.Array, in_shape: tuple[int, ...], contract: Any) -> jax.Array:
        rank = self.lora.rank
        a_init = nn.with_logical_partitioning(_kaiming_uniform, (*self.in_axes, "lora_rank"))
        b_init = nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", *self.out_axes))
        # Lambdas: the rng is drawn only when the variable is created (init), never at apply time.
        a = self.variable("lora", "a", lambda: a_init(self.make_rng("lora"), (*in_shape, rank), ADAPTER_DTYPE))
        b = self.variable("lora", "b", lambda: b_init(None, (rank, *self.out_shape), ADAPTER_DTYPE))
        if not self.use_lora:
            return jnp.zeros((), self.dtype)
        x_in = nn.Dropout(self.lora.dropout, deterministic=self.deterministic)(x).astype(self.dtype)
        down = jax.lax.dot_general(x_in, nn.unbox(a.value).astype(self.dtype), (contract, ((), ())))
        up = jax.lax.dot_general(down, nn.unbox(b.value).astype(self.dtype), (((down.ndim - 1,), (0,)), ((), ())))
        return (self.lora.scale * up).astype(self.dtype)


def _kaiming_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) over A's input dims (as PEFT initialises LoRA's A)."""
    fan_in = 1
    for d in shape[:-1]:
        fan_in *= d
    bound = fan_in ** -0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def rotary_tables(positions_BxT: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, Dh] for the given positions, computed in float32, cast to the compute dtype."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(config.rope, config.head_dim))
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(config.dtype), jnp.sin(angles).astype(config.dtype)


def apply_rotary(x_BxTxNxDh: jax.Array, cos_BxTxDh: jax.Array, sin_BxTxDh: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + Dh/2) of every head by the position's angles (the 'rotate_half' layout of HF)."""
    half = x_BxTxNxDh.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxDh[..., half:], x_BxTxNxDh[..., :half]], axis=-1)
    return x_BxTxNxDh * cos_BxTxDh[:, :, None, :] + rotated * sin_BxTxDh[:, :, None, :]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings, optional q/k norm, and an optional cache write."""

    config: ModelConfig
    lora: LoraConfig | None
    use_lora: bool
    deterministic: bool

    def _proj(self, name: str, out_shape: tuple[int, ...], in_axes: tuple[str, ...], out_axes: tuple[str, ...],
              use_bias: bool) -> Projection:
        c = self.config
        lora = self.lora if self.lora is not None and name in self.lora.targets else None
        return Projection(out_shape, in_axes, out_axes, use_bias, c.dtype, c.param_dtype, lora, self.use_lora,
                          self.deterministic, name=name)

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array, layout: "AttentionLayout",
                 cache_kv: tuple[jax.Array, jax.Array] | None):
        c = self.config
        q = self._proj("q", (c.num_heads, c.head_dim), ("embed",), ("heads", "head_dim"), c.qkv_bias)(x_BxTxD)
        k = self._proj("k", (c.num_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"), c.qkv_bias)(x_BxTxD)
        v = self._proj("v", (c.num_kv_heads, c.head_dim), ("embed",), ("kv_heads", "head_dim"), c.qkv_bias)(x_BxTxD)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, "head_dim", c.param_dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, "head_dim", c.param_dtype, name="k_norm")(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        batch, steps = q.shape[:2]
        groups = c.num_heads // c.num_kv_heads
        # Key sources: the cache's live slots (read in place, never copied) and the new tokens. The caller writes
        # the new keys/values into the cache once for all layers.
        k_BxKxTxDh, v_BxKxTxDh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        q_BxKxGxTxDh = q.reshape(batch, steps, c.num_kv_heads, groups, c.head_dim).transpose(0, 2, 3, 1, 4)
        sources, new_kv = [KeySource(k_BxKxTxDh, v_BxKxTxDh, layout.new_segments, layout.new_order)], None
        if cache_kv is not None:
            k_cache, v_cache = cache_kv
            live = layout.old_segments.shape[1]
            sources.insert(0, KeySource(k_cache[:, :, :live], v_cache[:, :, :live], layout.old_segments,
                                        layout.old_order))
            new_kv = (k_BxKxTxDh.astype(k_cache.dtype), v_BxKxTxDh.astype(v_cache.dtype))
        block = (c.sampling_block or c.attention_block) if cache_kv is not None else c.attention_block
        out = attention(q_BxKxGxTxDh, sources, layout.new_segments, layout.new_order, c.head_dim ** -0.5,
                        c.attention, block, block)
        # Attention's output comes in the operands' batch order (b, k): XLA's CPU dot is several times slower when
        # asked to emit another layout; the result is small, so transpose it afterwards.
        out_BxTxHxDh = out.transpose(0, 3, 1, 2, 4).reshape(batch, steps, c.num_heads, c.head_dim)
        y = self._proj("o", (c.hidden_size,), ("heads", "head_dim"), ("embed",), c.o_bias)(out_BxTxHxDh)
        return y, new_kv


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: ModelConfig
    lora: LoraConfig | None
    use_lora: bool
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        c = self.config

        def proj(name: str, width: int, in_axis: str, out_axis: str) -> Projection:
            lora = self.lora if self.lora is not None and name in self.lora.targets else None
            return Projection((width,), (in_axis,), (out_axis,), c.mlp_bias, c.dtype, c.param_dtype, lora,
                              self.use_lora, self.deterministic, name=name)

        gate = proj("gate", c.intermediate_size, "embed", "mlp")(x_BxTxD)
        up = proj("up", c.intermediate_size, "embed", "mlp")(x_BxTxD)
        return proj("down", c.hidden_size, "mlp", "embed")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Scanned: (carry, per-layer cache) -> same."""

    config: ModelConfig
    lora: LoraConfig | None
    use_lora: bool
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, cache_kv: Any, cos: jax.Array, sin: jax.Array, layout: Any):
        c = self.config
        # The layer input is what recomputation keeps for the backward pass: one [B, T, D] per layer. Training
        # rules split its tokens over `tensor` (sequence parallelism), so each device keeps 1/tensor of it.
        x_BxTxD = _placed(x_BxTxD, ("batch", "activation_length", "activation_embed"))
        h = RMSNorm(c.rms_norm_eps, "embed", c.param_dtype, name="input_norm")(x_BxTxD)
        attn_out, new_kv = Attention(c, self.lora, self.use_lora, self.deterministic, name="attn")(
            h, cos, sin, layout, cache_kv)
        x_BxTxD = x_BxTxD + attn_out
        h = RMSNorm(c.rms_norm_eps, "embed", c.param_dtype, name="post_attn_norm")(x_BxTxD)
        x_BxTxD = x_BxTxD + MLP(c, self.lora, self.use_lora, self.deterministic, name="mlp")(h)
        return x_BxTxD, new_kv


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nn.Module):
    """The whole model: embed -> L scanned layers -> final norm -> logits (float32)."""

    config: ModelConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array,
                 cache: KVCache | None = None, use_lora: bool = True, deterministic: bool = True,
                 kv_limit: int | None = None, logits_at_BxK: jax.Array | None = None,
                 with_logits: bool = True) -> DecoderOutput:
        c = self.config
        embedding = _param(self, "embedding", nn.initializers.normal(_INIT_STD), (c.vocab_size, c.hidden_size),
                           ("vocab", "embed"), c.param_dtype)
        x = jnp.take(embedding, tokens_BxT, axis=0).astype(c.dtype)
        cos, sin = rotary_tables(positions_BxT, c)
        layout, write_start, new_segments, new_end = _attention_layout(segment_ids_BxT, cache, kv_limit)

        layer_cls = DecoderLayer
        if c.remat != "none":
            layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "lora": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        layers = scanned(c, self.lora, use_lora, deterministic, name="layers")
        cache_kv = None if cache is None else (cache.k_LxBxKxSxDh, cache.v_LxBxKxSxDh)
        x, new_kv = layers(x, cache_kv, cos, sin, layout)

        x = RMSNorm(c.rms_norm_eps, "embed", c.param_dtype, name="final_norm")(x)
        if not c.tie_word_embeddings:  # created even when unused, so parameters never depend on the call
            head = _param(self, "lm_head", nn.initializers.normal(_INIT_STD), (c.hidden_size, c.vocab_size),
                          ("embed", "vocab"), c.param_dtype)
        if not with_logits:  # the caller applies the head itself (e.g. chunked log-probs for training)
            return DecoderOutput(None, x, self._updated_cache(cache, new_kv, write_start, new_segments, new_end))
        # Logits only where asked (e.g. each row's last prompt token): the vocab projection dominates short steps.
        x_head = x if logits_at_BxK is None else jnp.take_along_axis(x, logits_at_BxK[..., None], axis=1)
        if c.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x_head, embedding.astype(c.dtype),
                                preferred_element_type=accumulation_dtype(c.dtype))
        else:
            logits = jnp.einsum("btd,dv->btv", x_head, head.astype(c.dtype),
                                preferred_element_type=accumulation_dtype(c.dtype))
        new_cache = self._updated_cache(cache, new_kv, write_start, new_segments, new_end)
        return DecoderOutput(logits.astype(jnp.float32), x, new_cache)

    @staticmethod
    def _updated_cache(cache, new_kv, write_start, new_segments, new_end) -> KVCache | None:
        """The cache after one in-place write of every layer's new keys/values."""
        if cache is None:
            return None
        return KVCache(write_kv(cache.k_LxBxKxSxDh, new_kv[0], write_start),
                       write_kv(cache.v_LxBxKxSxDh, new_kv[1], write_start), new_segments, new_end)


def write_kv(cache_LxBxKxSxDh: jax.Array, new_LxRxKxTxDh: jax.Array, start_R: jax.Array,
             rows_R: jax.Array | None = None) -> jax.Array:
    """Write every layer's new keys (or values) of rows `rows_R` (all rows when None) at slots start..start+T-1.

    Each (row, new token) pair is one scatter index; layers, kv heads and head_dim form the written window, so the
    update is in place on a donated cache. Slots past the end are dropped, as in `write_rows`.
    """
    count, steps = new_LxRxKxTxDh.shape[1], new_LxRxKxTxDh.shape[3]
    rows_R = jnp.arange(count) if rows_R is None else rows_R
    rows = jnp.broadcast_to(rows_R[:, None], (count, steps))
    slots = start_R[:, None] + jnp.arange(steps)[None, :]
    indices_RxTx2 = jnp.stack([rows, slots], axis=-1)
    numbers = jax.lax.ScatterDimensionNumbers(update_window_dims=(0, 2, 4), inserted_window_dims=(1, 3),
                                              scatter_dims_to_operand_dims=(1, 3))
    return jax.lax.scatter(cache_LxBxKxSxDh, indices_RxTx2, new_LxRxKxTxDh, numbers,
                           indices_are_sorted=rows_R is None, unique_indices=True,
                           mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def write_rows(buffer_BxS: jax.Array, new_RxT: jax.Array, start_R: jax.Array,
               rows_R: jax.Array | None = None) -> jax.Array:
    """Write the T new entries of rows `rows_R` (all rows when None) at slots start..start+T-1 of that row; slots
    past the end are dropped (the padding of a chunk near a full cache), never wrapped or clamped onto real entries."""
    count, steps = new_RxT.shape[:2]
    rows = (jnp.arange(count) if rows_R is None else rows_R)[:, None]
    slots = start_R[:, None] + jnp.arange(steps)[None, :]
    return buffer_BxS.at[rows, slots].set(new_RxT, mode="drop")


class AttentionLayout(NamedTuple):
    """Who sees whom, without a [B, T, S] mask: segment ids and order (write slot) of the new tokens and of the
    attended cache slots (None without a cache). Query t sees key s when their segments match, are non-zero, and
    s's order is not after t's (see models/attention.py)."""

    new_segments: jax.Array  # [B, T]
    new_order: jax.Array  # [B, T]
    old_segments: jax.Array | None  # [B, kv_limit]: 0 for slots at or past the row's end (stale)
    old_order: jax.Array | None


def _attention_layout(segment_ids_BxT: jax.Array, cache: KVCache | None, kv_limit: int | None = None):
    """The attention layout plus, with a cache, where to write and the cache's new segments and ends.

    Without a cache the keys are the T new tokens. With a cache they are the first `kv_limit` cache slots (all when
    None) followed by the T new tokens; a cache slot counts only below the row's end (later slots are stale).
    """
    steps = segment_ids_BxT.shape[1]
    new_slot = jnp.arange(steps)[None, :]
    segments = segment_ids_BxT.astype(jnp.int32)
    if cache is None:
        return AttentionLayout(segments, jnp.broadcast_to(new_slot, segments.shape), None, None), None, None, None
    write_start = cache.end_B
    attended = cache.segment_ids_BxS[:, :kv_limit]
    old_slot = jnp.arange(attended.shape[1])[None, :]
    old_segments = jnp.where(old_slot < write_start[:, None], attended, 0)
    layout = AttentionLayout(segments, write_start[:, None] + new_slot, old_segments,
                             jnp.broadcast_to(old_slot, old_segments.shape))
    new_segments = write_rows(cache.segment_ids_BxS, segments, write_start)
    # The row's end moves past its last real (non-zero segment) token, so right padding of a chunk is
    # overwritten by the next write while left padding stays behind as empty slots.
    has_token = segment_ids_BxT != 0
    last_real = jnp.max(jnp.where(has_token, write_start[:, None] + new_slot + 1, 0), axis=1)
    new_end = jnp.where(jnp.any(has_token, axis=1), last_real, write_start).astype(jnp.int32)
    return layout, write_start, new_segments, new_end


# ---- functional API: plain pytrees in, arrays out ----------------------------------------------------------------


def positions_from_segments(segment_ids_BxT: jax.Array) -> jax.Array:
    """Position of every token within its segment (0 at each segment start; 0 on padding)."""
    steps = segment_ids_BxT.shape[1]
    index = jnp.broadcast_to(jnp.arange(steps), segment_ids_BxT.shape)
    previous = jnp.pad(segment_ids_BxT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts = jnp.where(segment_ids_BxT != previous, index, 0)
    positions = index - jax.lax.cummax(starts, axis=1)
    return jnp.where(segment_ids_BxT != 0, positions, 0).astype(jnp.int32)


def init_params(config: ModelConfig, rng: jax.Array, lora: LoraConfig | None = None) -> tuple[dict, dict]:
    """Random parameters (HF's init: normal(0.02), norms 1, biases 0) and LoRA adapters ({} without LoRA)."""
    # One compiled program: run op by op, the init compiles every small op on its own (seconds on a CPU).
    variables = nn.unbox(_jitted_init(config, rng, lora))
    return variables["params"], variables.get("lora", {})


def param_axes(config: ModelConfig, lora: LoraConfig | None = None) -> tuple[dict, dict]:
    """Logical axis names of every parameter and adapter leaf, as `jax.sharding.PartitionSpec`s of names."""
    specs = nn.get_partition_spec(_abstract_variables(config, lora))
    return specs["params"], specs.get("lora", {})


def abstract_params(config: ModelConfig, lora: LoraConfig | None = None) -> tuple[dict, dict]:
    """Shapes and dtypes of the parameters and adapters (`jax.ShapeDtypeStruct`s), without allocating them."""
    abstract = nn.unbox(_abstract_variables(config, lora))
    return abstract["params"], abstract.get("lora", {})


@functools.lru_cache(maxsize=16)
def _abstract_variables(config: ModelConfig, lora: LoraConfig | None) -> dict:
    """The boxed variable tree of the init, as shapes and axis names: traced once per (config, lora), since the
    sharding, sampling and checkpoint code ask for it every time they place or load parameters (each trace of the
    whole model costs about a second on a CPU). Callers get new trees built from it, never this one."""
    return jax.eval_shape(lambda key: _init_variables(config, key, lora), jax.random.key(0))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_init(config: ModelConfig, rng: jax.Array, lora: LoraConfig | None) -> dict:
    return _init_variables(config, rng, lora)


def _init_variables(config: ModelConfig, rng: jax.Array, lora: LoraConfig | None) -> dict:
    params_rng, lora_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config, lora).init({"params": params_rng, "lora": lora_rng}, tokens, tokens, tokens + 1)


def forward(params: dict, config: ModelConfig, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
            segment_ids_BxT: jax.Array | None = None, cache: KVCache | None = None,
            lora_params: dict | None = None, lora: LoraConfig | None = None, dropout_rng: jax.Array | None = None,
            kv_limit: int | None = None, logits_at_BxK: jax.Array | None = None,
            with_logits: bool = True) -> DecoderOutput:
    """Run the decoder. Without segment ids every token is real; without positions they follow the segments.

    With `lora_params` and `lora` the adapters are applied (dropout only when `dropout_rng` is given); without them
    the base model runs, which is also the reference policy of a LoRA run. With a cache, `kv_limit` (static) bounds
    the slots attended to (the caller guarantees every write lands below it); `logits_at_BxK` picks the positions
    whose logits are computed (all when None); `with_logits=False` returns only hidden states (logits None).
    """
    return _forward(params, config, tokens_BxT, positions_BxT, segment_ids_BxT, cache, lora_params, lora,
                    dropout_rng, kv_limit, logits_at_BxK, with_logits)


# Jitted, and inlined into any caller that is itself traced: called eagerly (tests, notebooks, the README) the
# whole decoder is one compiled program instead of a hundred one-op programs, each compiled on first use.
@functools.partial(jax.jit, static_argnames=("config", "lora", "kv_limit", "with_logits"), inline=True)
def _forward(params: dict, config: ModelConfig, tokens_BxT: jax.Array, positions_BxT: jax.Array | None,
             segment_ids_BxT: jax.Array | None, cache: KVCache | None, lora_params: dict | None,
             lora: LoraConfig | None, dropout_rng: jax.Array | None, kv_limit: int | None,
             logits_at_BxK: jax.Array | None, with_logits: bool) -> DecoderOutput:
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    if positions_BxT is None:
        positions_BxT = positions_from_segments(segment_ids_BxT)
    use_lora = bool(lora_params) and lora is not None
    variables = {"params": params}
    if use_lora:
        variables["lora"] = lora_params
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    model = Decoder(config, lora if use_lora else None)
    return model.apply(variables, tokens_BxT, positions_BxT, segment_ids_BxT, cache, use_lora=use_lora,
                       deterministic=dropout_rng is None, kv_limit=kv_limit, logits_at_BxK=logits_at_BxK,
                       with_logits=with_logits, rngs=rngs)
