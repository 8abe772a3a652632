"""Attention kernels over key sources, masked by segment ids and order; dense (the reference) and blockwise.

Every kernel computes, per kv head k and query group g,

    out[t] = sum_s softmax_s(scale * q[t] . key[s]) value[s]    over the keys s that t may see,

where query t may see key s when both carry the same non-zero segment id and `order[s] <= order[t]` (the slot a
token is written to: causality, for new tokens and cache slots alike). A query that may see no key (padding)
gets zeros. Keys come in *sources* (the cache's live slots, then the new tokens), so the cache is read in place,
never concatenated with the new keys.

`blockwise_attention` is the flash-attention algorithm in plain JAX: it walks key blocks with an online softmax
(running max and sum), so it holds `[B, K, G, block_q, block_k]` scores at a time instead of `[.., T, S]`, skips
blocks in which no query sees any key (the future of a causal sequence, other segments), and its gradient
recomputes scores block by block from the output and the log-sum-exp (a custom VJP) instead of storing them.
Memory grows linearly with the sequence, with or without `remat` (checked with XLA's memory analysis in
tests/test_attention.py): the forward walks key blocks in a while loop, which JAX never unzips into stored per-block
values when a remat'd layer is recomputed (a scan there was stored block by block: quadratic again).
`dense_attention` materialises all scores; it is the reference the blockwise kernel is tested against, and the
faster choice for short sequences.

On a GPU, `attention(kernel="blockwise")` runs cuDNN's fused flash attention (`jax.nn.dot_product_attention`) for
half-precision self-attention when every row holds one sequence from slot 0 followed by padding (the layout of
training batches and log-prob passes); rows with packed segments, float32, and reads of a KV cache use the portable
kernel. On an H100 the fused kernel is 6-13x faster than the portable one at 4K-32K tokens
(benchmarks/RESULTS.md).

Shapes: B batch, K kv heads, G query heads per kv head, T queries, S keys, D head dim.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxagent.models.config import accumulation_dtype

KERNELS = ("blockwise", "dense")


class KeySource(NamedTuple):
    """Keys and values [B, K, S, D] with each slot's segment id and order [B, S] (segment 0 = never seen)."""

    keys: jax.Array
    values: jax.Array
    segments: jax.Array
    order: jax.Array


def attention(q_BxKxGxTxD: jax.Array, sources: list[KeySource], q_segments_BxT: jax.Array, q_order_BxT: jax.Array,
              scale: float, kernel: str = "blockwise", block_q: int = 512, block_k: int = 512) -> jax.Array:
    """Attention of the queries over every source's keys; [B, K, G, T, D] in the queries' dtype.

    `blockwise` on a GPU, for half-precision queries attending to themselves only (training, log-probs), runs
    cuDNN's fused flash attention when every row holds one sequence from slot 0 (the layout of training batches;
    checked on the data, with the portable kernel as the other branch). One query per row over sources that each
    fit one key block (a decode step over a short cache) takes the dense kernel: the scores the block walk would
    hold anyway, without its loops (decoding in the tiny job is about a fifth faster on a CPU)."""
    if kernel == "dense" or (kernel == "blockwise" and _one_query_within_a_block(q_BxKxGxTxD, sources, block_k)):
        return dense_attention(q_BxKxGxTxD, sources, q_segments_BxT, q_order_BxT, scale)
    if kernel == "blockwise":
        if _cudnn_applies(q_BxKxGxTxD, sources):
            return cudnn_or_blockwise(q_BxKxGxTxD, sources[0], q_segments_BxT, q_order_BxT, scale, block_q, block_k)
        return blockwise_attention(q_BxKxGxTxD, sources, q_segments_BxT, q_order_BxT, scale, block_q, block_k)
    raise ValueError(f"unknown attention kernel {kernel!r}; valid: {', '.join(KERNELS)}")


def _one_query_within_a_block(q, sources, block_k) -> bool:
    return q.shape[3] == 1 and all(src.keys.shape[2] <= block_k for src in sources)


# ---- cuDNN (GPU) ----------------------------------------------------------------------------------------------------


def _cudnn_applies(q, sources) -> bool:
    """cuDNN's kernel takes bf16/f16 and head dims up to 128 (multiples of 8); here only self-attention."""
    return (jax.default_backend() == "gpu" and len(sources) == 1 and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0)


def cudnn_or_blockwise(q_BxKxGxTxD, source: KeySource, q_segments_BxT, q_order_BxT, scale, block_q=512,
                       block_k=512) -> jax.Array:
    """cuDNN's causal flash attention with sequence lengths when every row is one sequence from slot 0 followed by
    padding (what causal + lengths means); otherwise the portable blockwise kernel. Both are compiled; the data
    picks one at run time, so the result is exact either way."""
    lengths_B = jnp.sum(q_segments_BxT != 0, axis=1).astype(jnp.int32)
    # A padding row (length 0) attends to its first slot inside cuDNN, so no softmax runs over nothing (NaN); its
    # output is zeroed below and its gradient is zero.
    fused_lengths_B = jnp.maximum(lengths_B, 1)
    slots = jnp.arange(q_segments_BxT.shape[1])[None, :]
    prefix = slots < lengths_B[:, None]
    simple = (jnp.all((q_segments_BxT != 0) == prefix) & jnp.all(jnp.where(prefix, q_segments_BxT, 0) ==
              jnp.where(prefix, q_segments_BxT[:, :1], 0)) & jnp.all(q_order_BxT == slots)
              & jnp.all(source.order == q_order_BxT) & jnp.all(source.segments == q_segments_BxT))

    def fused(q, keys, values):
        b, k, g, t, d = q.shape
        out = jax.nn.dot_product_attention(
            q.reshape(b, k * g, t, d).transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3).astype(q.dtype),
            values.transpose(0, 2, 1, 3).astype(q.dtype), scale=scale, is_causal=True,
            query_seq_lengths=fused_lengths_B, key_value_seq_lengths=fused_lengths_B, implementation="cudnn")
        out = out.transpose(0, 2, 1, 3).reshape(b, k, g, t, d)
        return jnp.where(prefix[:, None, None, :, None], out, 0).astype(q.dtype)  # padding queries see nothing

    def portable(q, keys, values):
        return blockwise_attention(q, [KeySource(keys, values, source.segments, source.order)], q_segments_BxT,
                                   q_order_BxT, scale, block_q, block_k)

    return jax.lax.cond(simple, fused, portable, q_BxKxGxTxD, source.keys, source.values)


def _visible(q_segments_BxT, q_order_BxT, k_segments_BxS, k_order_BxS) -> jax.Array:
    """[B, T, S]: whether query t may see key s."""
    same = k_segments_BxS[:, None, :] == q_segments_BxT[:, :, None]
    return same & (k_segments_BxS[:, None, :] != 0) & (k_order_BxS[:, None, :] <= q_order_BxT[:, :, None])


def _scores(q, keys, scale):
    return jnp.einsum("bkgtd,bksd->bkgts", q, keys.astype(q.dtype),
                      preferred_element_type=accumulation_dtype(q.dtype)) * scale


def dense_attention(q_BxKxGxTxD, sources, q_segments_BxT, q_order_BxT, scale) -> jax.Array:
    """All scores at once, per source (no key concatenation); the reference for the blockwise kernel."""
    scores = [jnp.where(_visible(q_segments_BxT, q_order_BxT, src.segments, src.order)[:, None, None],
                        _scores(q_BxKxGxTxD, src.keys, scale), -jnp.inf) for src in sources]
    peak = _finite(jnp.max(jnp.stack([jnp.max(s, axis=-1) for s in scores]), axis=0))
    weights = [jnp.exp(s - peak[..., None]) for s in scores]
    total = sum(jnp.sum(w, axis=-1) for w in weights)
    dtype = q_BxKxGxTxD.dtype
    out = sum(jnp.einsum("bkgts,bksd->bkgtd", w.astype(dtype), src.values.astype(dtype),
                         preferred_element_type=accumulation_dtype(dtype)) for w, src in zip(weights, sources))
    return (out / _nonzero(total)[..., None]).astype(dtype)


def _finite(peak):
    """A row that sees nothing has max -inf; 0 keeps exp(-inf - peak) at 0 instead of NaN."""
    return jnp.where(jnp.isneginf(peak), 0.0, peak)


def _nonzero(total):
    return jnp.where(total == 0, 1.0, total)


# ---- blockwise (flash) attention ----------------------------------------------------------------------------------


def blockwise_attention(q_BxKxGxTxD, sources, q_segments_BxT, q_order_BxT, scale, block_q=512, block_k=512):
    """Online-softmax attention over key blocks, with a recomputing gradient (see the module docstring)."""
    steps = q_BxKxGxTxD.shape[3]
    bq = min(block_q, steps)
    q, q_seg, q_ord = _pad_queries(q_BxKxGxTxD, q_segments_BxT, q_order_BxT, bq)
    # Keys are read block by block where they lie (a cache is never copied); a source is padded (with segment 0)
    # only when its length is not a whole number of blocks.
    blocks = tuple(min(block_k, src.keys.shape[2]) for src in sources)
    padded = tuple(_pad_keys(src, bk) for src, bk in zip(sources, blocks))
    out = _flash(q, padded, q_seg, q_ord, scale, bq, blocks)
    return out[:, :, :, :steps]


def _pad_queries(q, segments, order, bq):
    pad = -q.shape[3] % bq
    if not pad:
        return q, segments, order
    return (jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0))), jnp.pad(segments, ((0, 0), (0, pad))),
            jnp.pad(order, ((0, 0), (0, pad))))


def _pad_keys(src: KeySource, bk: int) -> KeySource:
    pad = -src.keys.shape[2] % bk
    if not pad:
        return src
    keys, values = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (src.keys, src.values))
    return KeySource(keys, values, jnp.pad(src.segments, ((0, 0), (0, pad))), jnp.pad(src.order, ((0, 0), (0, pad))))


def _key_block(src: KeySource, j, bk: int) -> KeySource:
    """Block j of a source: keys/values [B, K, bk, D], segments/order [B, bk]."""
    return KeySource(jax.lax.dynamic_slice_in_dim(src.keys, j * bk, bk, axis=2),
                     jax.lax.dynamic_slice_in_dim(src.values, j * bk, bk, axis=2),
                     jax.lax.dynamic_slice_in_dim(src.segments, j * bk, bk, axis=1),
                     jax.lax.dynamic_slice_in_dim(src.order, j * bk, bk, axis=1))


def _query_blocks(x, bq, axis):
    """Split the query axis into [n, ..., bq, ...] with the block index first."""
    shape = x.shape
    n = shape[axis] // bq
    x = x.reshape(*shape[:axis], n, bq, *shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge_query_blocks(x, axis):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, sources, q_seg, q_ord, scale, bq, blocks):
    return _flash_forward(q, sources, q_seg, q_ord, scale, bq, blocks)[0]


def _flash_forward(q, sources, q_seg, q_ord, scale, bq, blocks):
    """Output [B, K, G, T, D] and log-sum-exp [B, K, G, T] (-inf where a query sees nothing)."""
    q_blocks = (_query_blocks(q, bq, 3), _query_blocks(q_seg, bq, 1), _query_blocks(q_ord, bq, 1))
    acc_dtype = accumulation_dtype(q.dtype)

    def one_query_block(block):
        q_i, seg_i, ord_i = block
        lead = q_i.shape[:-1]
        carry = (jnp.full(lead, -jnp.inf, acc_dtype), jnp.zeros(lead, acc_dtype), jnp.zeros(q_i.shape, acc_dtype))
        for src, bk in zip(sources, blocks):
            def key_block(j, carry, src=src, bk=bk):
                kb = _key_block(src, j, bk)
                visible = _visible(seg_i, ord_i, kb.segments, kb.order)

                def update(carry):
                    peak, total, acc = carry
                    s = jnp.where(visible[:, None, None], _scores(q_i, kb.keys, scale), -jnp.inf)
                    new_peak = jnp.maximum(peak, jnp.max(s, axis=-1))
                    safe = _finite(new_peak)
                    p = jnp.exp(s - safe[..., None])
                    fade = jnp.exp(peak - safe)
                    pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(q_i.dtype), kb.values.astype(q_i.dtype),
                                    preferred_element_type=acc_dtype)
                    return new_peak, total * fade + jnp.sum(p, axis=-1), acc * fade[..., None] + pv

                return jax.lax.cond(jnp.any(visible), update, lambda c: c, carry)

            # A while loop (a traced trip count): JAX cannot differentiate through it, so it never stores per-block
            # values for a gradient; the gradient is the custom VJP below.
            carry = jax.lax.fori_loop(0, jnp.int32(src.keys.shape[2] // bk), key_block, carry)
        peak, total, acc = carry
        out = (acc / _nonzero(total)[..., None]).astype(q.dtype)
        lse = jnp.where(total > 0, _finite(peak) + jnp.log(_nonzero(total)), -jnp.inf)
        return out, lse

    out, lse = jax.lax.map(one_query_block, q_blocks)
    return _merge_query_blocks(out, 3), _merge_query_blocks(lse, 3)


def _flash_fwd(q, sources, q_seg, q_ord, scale, bq, blocks):
    out, lse = _flash_forward(q, sources, q_seg, q_ord, scale, bq, blocks)
    return out, (q, sources, q_seg, q_ord, out, lse)



def _flash_bwd(scale, bq, blocks, residuals, d_out):
    """FlashAttention-2's backward: per key block, walk the query blocks, recomputing probabilities from the lse."""
    q, sources, q_seg, q_ord, out, lse = residuals
    acc_dtype = accumulation_dtype(q.dtype)
    delta = jnp.sum(d_out.astype(acc_dtype) * out.astype(acc_dtype), axis=-1)  # [B, K, G, T]
    q_blocks = tuple(_query_blocks(x, bq, axis) for x, axis in
                     ((q, 3), (q_seg, 1), (q_ord, 1), (d_out, 3), (lse, 3), (delta, 3)))
    d_q = jnp.zeros(q_blocks[0].shape, acc_dtype)
    d_sources = []
    for src, bk in zip(sources, blocks):
        def key_block(d_q, j, src=src, bk=bk):
            kb = _key_block(src, j, bk)

            def query_block(d_kv, qb):
                q_i, seg_i, ord_i, do_i, lse_i, delta_i = qb
                visible = _visible(seg_i, ord_i, kb.segments, kb.order)

                def grads(d_kv):
                    d_k, d_v = d_kv
                    s = _scores(q_i, kb.keys, scale)
                    p = jnp.where(visible[:, None, None], jnp.exp(s - lse_i[..., None]), 0.0)
                    d_v = d_v + _contract_queries(do_i, p.astype(do_i.dtype))
                    dp = jnp.einsum("bkgtd,bksd->bkgts", do_i, kb.values.astype(do_i.dtype),
                                    preferred_element_type=acc_dtype)
                    ds = (p * (dp - delta_i[..., None]) * scale).astype(q_i.dtype)
                    d_qi = jnp.einsum("bkgts,bksd->bkgtd", ds, kb.keys.astype(q_i.dtype),
                                      preferred_element_type=acc_dtype)
                    d_k = d_k + _contract_queries(q_i, ds)
                    return (d_k, d_v), d_qi

                def skip(d_kv):
                    return d_kv, jnp.zeros(q_i.shape, acc_dtype)

                return jax.lax.cond(jnp.any(visible), grads, skip, d_kv)

            zeros = jnp.zeros(kb.keys.shape, acc_dtype)
            (d_k, d_v), d_q_parts = jax.lax.scan(query_block, (zeros, zeros), q_blocks)
            return d_q + d_q_parts, (d_k, d_v)

        d_q, (d_k, d_v) = jax.lax.scan(key_block, d_q, jnp.arange(src.keys.shape[2] // bk))
        d_sources.append(KeySource(_merge_key_blocks(d_k).astype(src.keys.dtype),
                                   _merge_key_blocks(d_v).astype(src.values.dtype), None, None))
    return _merge_query_blocks(d_q, 3).astype(q.dtype), tuple(d_sources), None, None


def _contract_queries(x_BxKxGxTxD, w_BxKxGxTxS):
    """sum over g, t of w[.., s] x[.., d] -> [B, K, S, D], computed as [B, K, D, S] and transposed.

    XLA:CPU's matmuls want the contracted axis of the left operand innermost, so XLA copies the left operand into
    that layout; `x` (D wide) is a far smaller copy than the [T, S] probabilities. On a CPU this took `tiny`'s SFT
    step from 0.35-0.36 s to 0.33-0.34 s (fastest of 30) and its LOOP updates about 10 % faster."""
    return jnp.einsum("bkgtd,bkgts->bkds", x_BxKxGxTxD, w_BxKxGxTxS,
                      preferred_element_type=accumulation_dtype(x_BxKxGxTxD.dtype)).swapaxes(2, 3)


def _merge_key_blocks(x_NxBxKxBKxD):
    """[n, B, K, bk, D] -> [B, K, n * bk, D]."""
    n, batch, heads, bk, dim = x_NxBxKxBKxD.shape
    return x_NxBxKxBKxD.transpose(1, 2, 0, 3, 4).reshape(batch, heads, n * bk, dim)


# optimize_remat: under scan (the layers) and remat, JAX would otherwise differentiate through the forward
# kernel itself, storing every block of scores as a residual (memory quadratic in T again).
_flash.defvjp(_flash_fwd, _flash_bwd, optimize_remat=True)
