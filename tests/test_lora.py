"""LoRA: a zero B is the base model, merging is exact, and only adapter leaves are trained."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxagent.models import LoraConfig, ModelConfig, forward, init_params, merge_lora
from jaxagent.models.lora import LoraConfigError

from conftest import VOCAB

CONFIG = ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=8, num_kv_heads=2, head_dim=8)
LORA = LoraConfig(rank=4, alpha=8.0)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 12)))


def _randomize_b(lora_params, seed=1):
    leaves, tree = jax.tree.flatten(lora_params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_fresh_adapters_leave_the_base_model_unchanged():
    params, lora_params = init_params(CONFIG, jax.random.key(0), LORA)
    assert all(float(jnp.abs(leaf).max()) == 0 for path, leaf in jax.tree_util.tree_leaves_with_path(lora_params)
               if path[-1].key == "b")
    base = forward(params, CONFIG, IDS).logits_BxTxV
    adapted = forward(params, CONFIG, IDS, lora_params=lora_params, lora=LORA).logits_BxTxV
    np.testing.assert_array_equal(base, adapted)


@pytest.mark.parametrize("targets", [LoraConfig().targets, ("q", "v"), ("o", "down")])
def test_merged_equals_unmerged(targets):
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    params, lora_params = init_params(CONFIG, jax.random.key(0), lora)
    lora_params = _randomize_b(lora_params)
    adapted = forward(params, CONFIG, IDS, lora_params=lora_params, lora=lora).logits_BxTxV
    merged = forward(merge_lora(params, lora_params, lora), CONFIG, IDS).logits_BxTxV
    assert float(jnp.abs(adapted - forward(params, CONFIG, IDS).logits_BxTxV).max()) > 1e-3  # adapters matter
    np.testing.assert_allclose(merged, adapted, atol=1e-5)


def test_only_lora_leaves_receive_gradients_and_change():
    params, lora_params = init_params(CONFIG, jax.random.key(0), LORA)
    optimizer = optax.adamw(1e-2)
    opt_state = optimizer.init(lora_params)  # the optimizer sees only adapters
    assert jax.tree.structure(opt_state[0].mu) == jax.tree.structure(lora_params)

    def loss(lora_params):
        logits = forward(params, CONFIG, IDS[:, :-1], lora_params=lora_params, lora=LORA).logits_BxTxV
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), IDS[:, 1:, None], -1))

    before = jax.tree.map(jnp.copy, params)
    new_lora = lora_params
    for _ in range(2):  # B is zero at first, so A's gradient appears from the second step on
        grads = jax.grad(loss)(new_lora)
        updates, opt_state = optimizer.update(grads, opt_state, new_lora)
        new_lora = optax.apply_updates(new_lora, updates)
    chex.assert_trees_all_equal(params, before)
    for old, new in zip(jax.tree.leaves(lora_params), jax.tree.leaves(new_lora)):
        assert float(jnp.abs(new - old).max()) > 0

    # The gradient reaching the base weights through the full model is nonzero, so the freeze is real, not vacuous.
    base_grad = jax.grad(lambda p: jnp.sum(forward(p, CONFIG, IDS).logits_BxTxV ** 2))(params)
    assert float(jnp.abs(base_grad["layers"]["mlp"]["up"]["kernel"]).max()) > 0


def test_dropout_applies_only_with_an_rng():
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    params, lora_params = init_params(CONFIG, jax.random.key(0), lora)
    lora_params = _randomize_b(lora_params)
    a = forward(params, CONFIG, IDS, lora_params=lora_params, lora=lora).logits_BxTxV
    b = forward(params, CONFIG, IDS, lora_params=lora_params, lora=lora).logits_BxTxV
    c = forward(params, CONFIG, IDS, lora_params=lora_params, lora=lora, dropout_rng=jax.random.key(3)).logits_BxTxV
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-4


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "lora rank=0 must be a positive integer"),
    (dict(dropout=1.5), "lora dropout=1.5 must be in"),
    (dict(targets=("q", "qkv")), "lora targets \\['q', 'qkv'\\] invalid; valid: q, k, v, o, gate, up, down"),
])
def test_bad_lora_config_names_the_value(kwargs, message):
    with pytest.raises(LoraConfigError, match=message):
        LoraConfig(**kwargs)
