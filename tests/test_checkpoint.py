"""Policy checkpoints (orbax) and their export to a Hugging Face folder, LoRA merged."""

from __future__ import annotations

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxagent.atomic import FolderExistsError
from jaxagent.checkpoint import Policy, load_policy, save_policy
from jaxagent.local_tokenizer import save_tokenizer, train_tokenizer
from jaxagent.models import LoraConfig, forward, init_params
from jaxagent.models.hf import load_hf_params

from conftest import hf_logits

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))


@pytest.fixture()
def policy(hf_models, tmp_path) -> Policy:
    config, params = load_hf_params(hf_models["llama3_gqa"])
    _, lora_params = init_params(config, jax.random.key(0), LORA)
    leaves, tree = jax.tree.flatten(lora_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    lora_params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    tokenizer = train_tokenizer(["hello world, an agent writes code"] * 10, vocab_size=300)
    return Policy(config, params, LORA, lora_params, save_tokenizer(tokenizer, tmp_path / "tok"))


def test_policy_round_trips(policy, tmp_path):
    folder = save_policy(tmp_path / "ckpt", policy)
    again = load_policy(folder)
    chex.assert_trees_all_equal(policy.params, again.params)
    chex.assert_trees_all_equal(policy.lora_params, again.lora_params)
    assert again.lora == policy.lora and again.config == policy.config
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_export_of_a_lora_policy_loads_in_transformers_with_equal_logits(policy, tmp_path):
    folder = save_policy(tmp_path / "ckpt", policy)
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "jaxagent.export", "--checkpoint", str(folder), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ids = np.random.default_rng(0).integers(0, policy.config.vocab_size, (2, 16))
    ours = forward(policy.params, policy.config, jnp.asarray(ids), lora_params=policy.lora_params,
                   lora=policy.lora).logits_BxTxV
    base = forward(policy.params, policy.config, jnp.asarray(ids)).logits_BxTxV
    assert float(jnp.abs(ours - base).max()) > 1e-3  # the adapters change the model, so the merge is tested
    np.testing.assert_allclose(hf_logits(out, ids), np.asarray(ours), atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template


def test_save_refuses_a_non_empty_folder(policy, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("user data")
    with pytest.raises(FolderExistsError, match="exists and is not empty"):
        save_policy(tmp_path / "ckpt", policy)
    assert (tmp_path / "ckpt" / "keep.txt").read_text() == "user data"


def test_interrupted_save_leaves_nothing(policy, tmp_path, monkeypatch):
    import jaxagent.checkpoint as checkpoint

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "wait_until_finished", crash)
    with pytest.raises(KeyboardInterrupt):
        save_policy(tmp_path / "ckpt", policy)
    assert not (tmp_path / "ckpt").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
