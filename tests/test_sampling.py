"""The sampler: token-exact greedy against transformers' generate, exact log-probs, continuation, buckets, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxagent.local_tokenizer import train_tokenizer
from jaxagent.models import ModelConfig, forward, init_params
from jaxagent.models.hf import load_hf_params
from jaxagent.sampling import Sampler, SamplingError, SamplingParams, bytes_of_tokens

from conftest import VOCAB

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def _prompts(seed=0, lengths=(5, 13, 2, 9)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


def _hf_greedy(folder, prompt, max_new, eos=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                         pad_token_id=0, use_cache=True)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["qwen2_untied", "llama3_gqa", "qwen3"])
def test_greedy_equals_transformers_generate_on_mixed_prompt_lengths(hf_models, family):
    config, params = load_hf_params(hf_models[family])
    sampler = Sampler(config, max_len=64)
    prompts = _prompts()
    batch, result = sampler.generate(params, sampler.start(params, prompts), GREEDY, jax.random.key(0))
    for prompt, tokens in zip(prompts, result.tokens):
        assert tokens == _hf_greedy(hf_models[family], prompt, 12)
    assert result.stop_reasons == ["max_new_tokens"] * 4
    np.testing.assert_array_equal(batch.lengths[:4], [len(p) + 12 for p in prompts])

    # Stopping on an end token: pick a token row 0 emits at step 6 and stop there, as HF does with eos_token_id.
    stop = result.tokens[0][5]
    params_stop = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(stop,))
    _, stopped = sampler.generate(params, sampler.start(params, prompts), params_stop, jax.random.key(0))
    for prompt, tokens in zip(prompts, stopped.tokens):
        reference = _hf_greedy(hf_models[family], prompt, 12, eos=stop)
        assert tokens == reference[: reference.index(stop) + 1] if stop in reference else tokens == reference
    assert stopped.stop_reasons[0] == "stop_token" and stopped.tokens[0][-1] == stop


def _full_logprobs(params, config, sequence, temperature):
    logits = forward(params, config, jnp.asarray([sequence])).logits_BxTxV[0]
    return jax.nn.log_softmax(logits / temperature, axis=-1)


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=1.0, max_new_tokens=16),
    SamplingParams(temperature=0.7, top_k=20, max_new_tokens=16),
    SamplingParams(temperature=1.3, top_p=0.8, max_new_tokens=16),
])
def test_sampled_logprobs_equal_a_full_forward(hf_models, sampling):
    config, params = load_hf_params(hf_models["llama3_gqa"])
    sampler = Sampler(config, max_len=64)
    prompts = _prompts(seed=1)
    _, result = sampler.generate(params, sampler.start(params, prompts), sampling, jax.random.key(7))
    for prompt, tokens, logprobs in zip(prompts, result.tokens, result.logprobs):
        table = _full_logprobs(params, config, prompt + tokens, sampling.temperature)
        expected = np.asarray(table[len(prompt) - 1:-1][np.arange(len(tokens)), np.asarray(tokens)])
        np.testing.assert_allclose(logprobs, expected, atol=1e-5, rtol=0)


def test_top_k_and_top_p_restrict_the_choice(hf_models):
    config, params = load_hf_params(hf_models["qwen3"])
    sampler = Sampler(config, max_len=64)
    prompt = _prompts(seed=2, lengths=(6,))
    for sampling in (SamplingParams(temperature=2.0, top_k=3, max_new_tokens=1),
                     SamplingParams(temperature=2.0, top_p=0.05, max_new_tokens=1)):
        allowed = set()
        for seed in range(24):
            _, result = sampler.generate(params, sampler.start(params, prompt), sampling, jax.random.key(seed))
            allowed.add(result.tokens[0][0])
        logits = np.asarray(forward(params, config, jnp.asarray(prompt)).logits_BxTxV[0, -1]) / 2.0
        ranked = list(np.argsort(-logits))
        if sampling.top_k:
            assert allowed <= set(ranked[:3]) and len(allowed) > 1
        else:  # the top token alone holds < 5 % only if the nucleus needs more; check the nucleus bound
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            nucleus = ranked[: int(np.searchsorted(np.cumsum(probs[ranked]), 0.05)) + 1]
            assert allowed <= set(nucleus)


def test_stop_strings_and_token_sequences():
    tokenizer = train_tokenizer(["```python\nprint(1)\n```\nText after the block."] * 20, vocab_size=300)
    config = ModelConfig(family="qwen2", vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, qkv_bias=True)
    params, _ = init_params(config, jax.random.key(0))
    sampler = Sampler(config, max_len=96, tokenizer=tokenizer)
    prompt = tokenizer.encode("```python\n")
    _, free = sampler.generate(params, sampler.start(params, [prompt]), SamplingParams(
        temperature=1.0, max_new_tokens=40), jax.random.key(3))
    pieces = bytes_of_tokens(tokenizer, config.vocab_size)
    # Target: the text of the first printable ASCII token after the third one; the reference stop is the first
    # token at which the generated bytes contain it (it may straddle tokens).
    target = next(pieces[t] for t in free.tokens[0][3:] if pieces[t] and pieces[t].isascii() and pieces[t].strip()
                  and pieces[t].decode().isprintable())
    stream, expected_stop = b"", None
    for j, token in enumerate(free.tokens[0]):
        stream += pieces[token]
        if target in stream:
            expected_stop = j
            break
    _, stopped = sampler.generate(params, sampler.start(params, [prompt]), SamplingParams(
        temperature=1.0, max_new_tokens=40, stop_strings=(target.decode(),)), jax.random.key(3))
    assert stopped.stop_reasons == ["stop_string"]
    assert stopped.tokens[0] == free.tokens[0][: expected_stop + 1]

    sequence = tuple(free.tokens[0][4:6])
    _, by_ids = sampler.generate(params, sampler.start(params, [prompt]), SamplingParams(
        temperature=1.0, max_new_tokens=40, stop_sequences=(sequence,)), jax.random.key(3))
    assert by_ids.stop_reasons == ["stop_sequence"] and tuple(by_ids.tokens[0][-2:]) == sequence


def _rollout(sampler, params, config, turns, seed, obs_lengths):
    """Generate, append an observation, repeat; returns per-row full sequences with sampled positions/logprobs."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (4, 11, 7)]
    batch = sampler.start(params, prompts)
    sequences = [list(p) for p in prompts]
    sampled = [[] for _ in prompts]  # (index in sequence, token, logprob)
    counts = []
    for turn in range(turns):
        sampling = SamplingParams(temperature=1.0, max_new_tokens=6 + turn % 3)
        batch, result = sampler.generate(params, batch, sampling, jax.random.key(seed * 100 + turn))
        for row, (tokens, logprobs) in enumerate(zip(result.tokens, result.logprobs)):
            sampled[row] += [(len(sequences[row]) + i, t, lp) for i, (t, lp) in enumerate(zip(tokens, logprobs))]
            sequences[row] += tokens
        # Some turns give a row no observation: appends then compute only the rows that receive tokens.
        observations = [None if (turn + row) % 4 == 3 else
                        rng.integers(0, VOCAB, obs_lengths[(turn + row) % len(obs_lengths)]).tolist()
                        for row in range(3)]
        batch = sampler.append(params, batch, observations)
        for row, obs in enumerate(observations):
            sequences[row] += obs or []
        counts.append(sampler.compile_count)
    return batch, sequences, sampled, counts


def test_ten_turn_continuation_matches_a_full_forward_and_stops_compiling(hf_models):
    config, params = load_hf_params(hf_models["qwen2_tied"])
    sampler = Sampler(config, max_len=256)
    batch, sequences, sampled, counts = _rollout(sampler, params, config, 10, seed=0, obs_lengths=(3, 9, 5))
    for row, sequence in enumerate(sequences):
        assert batch.lengths[row] == len(sequence)
        table = _full_logprobs(params, config, sequence, 1.0)
        index = np.asarray([i for i, _, _ in sampled[row]])
        tokens = np.asarray([t for _, t, _ in sampled[row]])
        np.testing.assert_allclose([lp for _, _, lp in sampled[row]], np.asarray(table[index - 1, tokens]), atol=1e-5)
    # Contexts grow from ~10 to ~150 tokens: only a few (rows, chunk, context, buffer) buckets are ever compiled.
    assert counts[-1] <= 10, counts
    # The same rollout shape again (other tokens, other observation lengths in the same buckets): a second run
    # meets the few bucket combinations the first did not, a third compiles nothing.
    _, _, _, second = _rollout(sampler, params, config, 10, seed=1, obs_lengths=(5, 3, 9))
    _, _, _, third = _rollout(sampler, params, config, 10, seed=2, obs_lengths=(9, 5, 3))
    assert second[-1] <= counts[-1] + 3 and third[-1] == second[-1], (counts, second, third)


def test_rows_can_be_refilled_and_dropped(hf_models):
    config, params = load_hf_params(hf_models["qwen3"])
    sampler = Sampler(config, max_len=64)
    prompts = _prompts(seed=4)
    batch, _ = sampler.generate(params, sampler.start(params, prompts), GREEDY, jax.random.key(0))
    new_prompt = _prompts(seed=5, lengths=(7,))[0]
    batch, untouched = sampler.generate(params, batch, GREEDY, jax.random.key(0))  # rows 0, 1 go on ...
    batch, _ = sampler.generate(params, sampler.start(params, prompts), GREEDY, jax.random.key(0))
    batch = sampler.refill(params, batch, {2: new_prompt})
    assert batch.lengths[2] == 7
    batch, refilled = sampler.generate(params, batch, GREEDY, jax.random.key(0), active=[False, False, True, False])
    _, alone = sampler.generate(params, sampler.start(params, [new_prompt]), GREEDY, jax.random.key(0))
    assert refilled.tokens[2] == alone.tokens[0] and refilled.tokens[0] == []
    _, after_refill = sampler.generate(params, batch, GREEDY, jax.random.key(0), active=[True, True, False, False])
    assert after_refill.tokens[:2] == untouched.tokens[:2]  # ... exactly as if row 2 had not been refilled

    with pytest.raises(SamplingError, match="this Batch was consumed by an earlier sampler call"):
        sampler.take(batch, [2])  # `batch` went into generate above

    batch, _ = sampler.generate(params, sampler.start(params, prompts), GREEDY, jax.random.key(0))
    small = sampler.take(sampler.refill(params, batch, {2: new_prompt}), [2])
    assert small.rows == 1 and len(small.lengths) == 1
    _, kept = sampler.generate(params, small, GREEDY, jax.random.key(0))
    assert kept.tokens[0] == alone.tokens[0]


def test_relayout_moves_rows_into_a_new_cache_and_counts_its_bytes(hf_models):
    """Rows moved (and reordered) into a shorter or longer cache go on exactly as before; rows left out are gone,
    and the new empty rows take a prompt as a new batch would. `cache_bytes` is what the cache's arrays hold."""
    config, params = load_hf_params(hf_models["qwen3"])
    sampler = Sampler(config, max_len=64, grow_cache=True)
    prompts = _prompts(seed=4)
    start = lambda: sampler.generate(params, sampler.start(params, prompts), GREEDY, jax.random.key(0))[0]  # noqa
    _, before = sampler.generate(params, start(), GREEDY, jax.random.key(0))
    moved = sampler.relayout(start(), [2, None, 0], slots=64)
    assert moved.rows == 3 and list(moved.lengths[:3]) == [start().lengths[2], 0, start().lengths[0]]
    assert moved.state.cache.segment_ids_BxS.shape == (4, 64)  # the batch bucket of 3 rows, the asked slots
    new_prompt = _prompts(seed=5, lengths=(7,))[0]
    moved = sampler.refill(params, moved, {1: new_prompt})
    _, after = sampler.generate(params, moved, GREEDY, jax.random.key(0))
    _, alone = sampler.generate(params, sampler.start(params, [new_prompt]), GREEDY, jax.random.key(0))
    assert after.tokens[0] == before.tokens[2] and after.tokens[2] == before.tokens[0]
    assert after.tokens[1] == alone.tokens[0]
    with pytest.raises(SamplingError, match="16 slots cannot hold row lengths up to"):
        sampler.relayout(start(), [0, 1], slots=16)

    held = sum(x.size * x.dtype.itemsize for x in sampler.empty(3, 40).state.cache)
    assert sampler.cache_bytes(3, 40) == held  # 3 rows -> a bucket of 4, 40 slots -> 64
    assert sampler.cache_bytes(4, 64) == held and sampler.cache_bytes(5, 64) == 2 * held


def test_a_full_cache_ends_the_turn_cleanly(hf_models):
    config, params = load_hf_params(hf_models["qwen2_tied"])
    sampler = Sampler(config, max_len=20)
    batch, result = sampler.generate(params, sampler.start(params, _prompts(lengths=(15, 3))),
                                     SamplingParams(temperature=0.0, max_new_tokens=8), jax.random.key(0))
    assert result.stop_reasons == ["cache_full", "max_new_tokens"]
    assert [len(t) for t in result.tokens] == [5, 8] and batch.lengths[0] == 20


@pytest.mark.parametrize("make, message", [
    (lambda s, p: s.start(p, [list(range(40))]), "row 0 would hold 40 tokens but the cache holds max_len=32"),
    (lambda s, p: s.start(p, [[1, 2], []]), "prompts\\[1\\] is empty"),
    (lambda s, p: s.start(p, "hello"), "prompts must be a non-empty list of token-id lists"),
    (lambda s, p: s.start(p, [[1, VOCAB + 5]]), f"holds id {VOCAB + 5} outside the vocabulary"),
    (lambda s, p: SamplingParams(stop_strings="```"), "stop_strings='```' must be a list of strings, got str"),
    (lambda s, p: SamplingParams(stop_token_ids=[1, "2"]), "must hold non-negative ints"),
    (lambda s, p: SamplingParams(stop_sequences=[1, 2]), "must be a list of token ids"),
    (lambda s, p: SamplingParams(temperature=-1), "temperature=-1 must be a number >= 0"),
    (lambda s, p: SamplingParams(top_p=0), "top_p=0 must be in \\(0, 1\\]"),
    (lambda s, p: s.generate(p, s.start(p, [[1]]), SamplingParams(stop_strings=("x",)), jax.random.key(0)),
     "stop_strings need the sampler's tokenizer"),
])
def test_bad_input_gets_a_clear_error(hf_models, make, message):
    config, params = load_hf_params(hf_models["qwen2_tied"])
    with pytest.raises(SamplingError, match=message):
        make(Sampler(config, max_len=32), params)


def _reference_distribution(logits, temperature, top_k=0, top_p=1.0):
    """NumPy, from the definitions: softmax(logits / T), keep the top-k, then the smallest top-p nucleus."""
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros_like(probs, bool)
    ranked = order[:top_k] if top_k else order
    mass = np.cumsum(probs[ranked]) / probs[ranked].sum()
    keep[ranked[: int(np.searchsorted(mass, top_p - 1e-9)) + 1]] = True
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 7, 1.0), (1.5, 0, 0.6),
                                                       (1.0, 12, 0.8)])
def test_sample_tokens_follows_the_reference_distribution(temperature, top_k, top_p):
    from jaxagent.sampling import sample_tokens

    vocab, draws = 300, 20000
    logits = np.random.default_rng(0).normal(0, 2.0, vocab).astype(np.float32)
    tokens, logps = jax.jit(sample_tokens, static_argnums=(4, 5, 6))(
        jnp.broadcast_to(jnp.asarray(logits), (draws, vocab)), jax.random.key(1), jnp.float32(temperature),
        jnp.float32(top_p), top_k, False, top_p < 1.0)
    expected = _reference_distribution(logits.astype(np.float64), temperature, top_k, top_p)
    observed = np.bincount(np.asarray(tokens), minlength=vocab) / draws
    assert observed[expected == 0].sum() == 0  # nothing outside the allowed set
    # Every token's frequency within 5 standard deviations of its probability (plus 3 draws, for the rarest): by
    # noise alone, some token of 300 strays that far in under 1 run of 1000; a temperature 10 % off fails it.
    assert np.all(np.abs(observed - expected) <= 5 * np.sqrt(expected * (1 - expected) / draws) + 3 / draws)
    # Log-probs are the untruncated softmax(logits / T), as the trainer recomputes them.
    full = logits / temperature - np.log(np.exp(logits / temperature - (logits / temperature).max()).sum()) - (
        logits / temperature).max()
    np.testing.assert_allclose(np.asarray(logps), full[np.asarray(tokens)], atol=1e-5)


def test_a_growing_cache_gives_the_same_turns_as_a_full_one(hf_models):
    """With grow_cache the cache starts at 16 slots and grows bucket by bucket as six turns lengthen the rows (to
    128 of 256 here); every sampled token and log-prob equals the full-length cache's."""
    config, params = load_hf_params(hf_models["qwen2_tied"])
    full = _rollout(Sampler(config, max_len=256), params, config, 6, seed=0, obs_lengths=(3, 9, 5))
    growing = _rollout(Sampler(config, max_len=256, grow_cache=True), params, config, 6, seed=0,
                       obs_lengths=(3, 9, 5))
    assert growing[1] == full[1] and growing[2] == full[2]  # sequences; (index, token, log-prob) per sample
    assert full[0].state.cache.segment_ids_BxS.shape[1] == 256
    assert growing[0].state.cache.segment_ids_BxS.shape[1] == 128 > max(len(s) for s in growing[1]) > 64


def test_min_prefill_rows_computes_idle_rows_gives_the_same_turns_and_compiles_fewer_programs(hf_models):
    """Appends to two of three rows compute four rows with `min_prefill_rows=4` (two idle), as do those to three:
    one append program per chunk and context bucket instead of one per row count too, and the same turns."""
    config, params = load_hf_params(hf_models["qwen2_tied"])
    one, four = Sampler(config, max_len=256), Sampler(config, max_len=256, min_prefill_rows=4)
    by_one = _rollout(one, params, config, 10, seed=0, obs_lengths=(3, 9, 5))
    by_four = _rollout(four, params, config, 10, seed=0, obs_lengths=(3, 9, 5))
    assert by_four[1] == by_one[1]  # the sequences
    for row_one, row_four in zip(by_one[2], by_four[2]):
        assert [(i, t) for i, t, _ in row_four] == [(i, t) for i, t, _ in row_one]
        np.testing.assert_allclose([lp for *_, lp in row_four], [lp for *_, lp in row_one], atol=1e-5)
    assert four._extend._cache_size() < one._extend._cache_size()
    with pytest.raises(SamplingError, match="min_prefill_rows=0 must be an integer >= 1"):
        Sampler(config, max_len=256, min_prefill_rows=0)
