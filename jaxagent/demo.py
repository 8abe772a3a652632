"""What `make run` runs until the training driver lands: every foundation piece, end to end, on a laptop CPU.

    python -m jaxagent.demo [--out runs/demo] [--steps 60]

1. trains a byte-level BPE tokenizer on local text and renders a chat with its template (token-in/token-out);
2. builds a tiny Qwen2-shaped decoder from scratch with LoRA adapters (r=8 on attention and MLP);
3. teaches the adapters one assistant reply by behaviour cloning (NLL on model tokens only; base weights frozen);
4. answers the prompt greedily with a KV cache and checks the reply is the taught one;
5. saves a policy checkpoint (orbax), exports it to a Hugging Face folder (LoRA merged), re-imports that folder
   and checks the logits are unchanged.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from jaxagent.checkpoint import Policy, save_policy
from jaxagent.errors import run_main
from jaxagent.local_tokenizer import save_tokenizer, train_tokenizer
from jaxagent.models import KVCache, LoraConfig, ModelConfig, forward, init_cache, init_params
from jaxagent.models.hf import load_hf_params, save_hf_checkpoint
from jaxagent.tokens import ChatRenderer

log = logging.getLogger("jaxagent.demo")

PROMPT = [
    {"role": "system", "content": "You are an agent. Answer with Python that calls the apps' APIs."},
    {"role": "user", "content": "Send Alice a message saying the meeting moved to 3pm."},
]
REPLY = ("```python\nalice = apis.contacts.search(query='Alice')[0]\n"
         "apis.messages.send(to=alice['phone'], text='The meeting moved to 3pm.')\n"
         "apis.supervisor.complete_task()\n```")
CORPUS = [REPLY, PROMPT[0]["content"], PROMPT[1]["content"],
          "Look up the API docs before calling an API.\nprint(apis.api_docs.show_api_descriptions(app_name='wallet'))",
          "The wallet balance is 42 dollars; transfer 10 to Bob and verify the new balance."] * 8


def tiny_config(vocab_size: int) -> ModelConfig:
    """A ~1M-parameter Qwen2-shaped decoder (q/k/v biases, GQA 2:1, tied embeddings)."""
    return ModelConfig(family="qwen2", vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True, tie_word_embeddings=True,
                       max_position_embeddings=1024)


def behaviour_clone(params: dict, lora_params: dict, config: ModelConfig, lora: LoraConfig, ids: jax.Array,
                    mask: jax.Array, steps: int, lr: float) -> tuple[dict, list[float]]:
    """Train only the adapters to predict the model tokens of one conversation; returns adapters and losses."""
    optimizer = optax.adam(lr)
    inputs, targets, weights = ids[None, :-1], ids[None, 1:], mask[None, 1:].astype(jnp.float32)

    def loss_fn(adapters):
        logits = forward(params, config, inputs, lora_params=adapters, lora=lora).logits_BxTxV
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
        return -jnp.sum(logp * weights) / jnp.sum(weights)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    opt_state, losses = optimizer.init(lora_params), []
    for _ in range(steps):
        lora_params, opt_state, loss = step(lora_params, opt_state)
        losses.append(float(loss))
    return lora_params, losses


def greedy_reply(params: dict, lora_params: dict, config: ModelConfig, lora: LoraConfig, prompt_ids: list[int],
                 stop_id: int, max_new: int) -> list[int]:
    """Greedy decoding with a KV cache: one prefill, then one token per step, until `stop_id` or `max_new`."""
    cache = init_cache(config, batch=1, max_len=len(prompt_ids) + max_new)

    @jax.jit
    def step(cache: KVCache, tokens: jax.Array, positions: jax.Array):
        out = forward(params, config, tokens, positions, jnp.ones_like(tokens), cache, lora_params, lora)
        return out.cache, jnp.argmax(out.logits_BxTxV[:, -1], axis=-1)

    tokens = jnp.asarray([prompt_ids], jnp.int32)
    cache, next_id = step(cache, tokens, jnp.arange(len(prompt_ids))[None])
    reply = [int(next_id[0])]
    while reply[-1] != stop_id and len(reply) < max_new:
        position = jnp.asarray([[len(prompt_ids) + len(reply) - 1]])
        cache, next_id = step(cache, jnp.asarray([[reply[-1]]], jnp.int32), position)
        reply.append(int(next_id[0]))
    return reply


def run_demo(out: Path, steps: int = 60, seed: int = 0) -> dict:
    """Run the five stages; returns their figures. `out` is replaced."""
    started = time.time()
    if out.exists():
        shutil.rmtree(out)
    tokenizer = train_tokenizer(CORPUS, vocab_size=384)
    tokenizer_dir = save_tokenizer(tokenizer, out / "tokenizer")
    renderer = ChatRenderer(tokenizer)
    conversation = renderer.start([*PROMPT, {"role": "assistant", "content": REPLY}])
    prompt_len = len(renderer.start(PROMPT).token_ids) + len(renderer.start(PROMPT).add_generation_prompt())
    print(f"[1/5] tokenizer: {len(tokenizer)} tokens; conversation {len(conversation.token_ids)} ids, "
          f"{sum(conversation.model_mask)} of them model tokens")

    config, lora = tiny_config(len(tokenizer)), LoraConfig(rank=8, alpha=16.0)
    params, lora_params = init_params(config, jax.random.key(seed), lora)
    print(f"[2/5] model: {config.family}, {config.num_params / 1e6:.2f}M base parameters, "
          f"{sum(x.size for x in jax.tree.leaves(lora_params)) / 1e3:.0f}K LoRA parameters")

    ids = jnp.asarray(conversation.token_ids, jnp.int32)
    mask = jnp.asarray(conversation.model_mask, jnp.int32)
    lora_params, losses = behaviour_clone(params, lora_params, config, lora, ids, mask, steps, lr=1e-2)
    print(f"[3/5] behaviour cloning (adapters only): loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps")

    reply_ids = greedy_reply(params, lora_params, config, lora, conversation.token_ids[:prompt_len],
                             renderer.end_of_turn_id, max_new=len(conversation.token_ids) - prompt_len + 8)
    reply = renderer.decode(reply_ids)
    print(f"[4/5] greedy reply ({len(reply_ids)} tokens, {'matches' if reply == REPLY else 'differs from'} the "
          f"taught reply):\n{reply}")

    policy_dir = save_policy(out / "policy", Policy(config, params, lora, lora_params, tokenizer_dir))
    hf_dir = save_hf_checkpoint(out / "hf", params, config, lora_params, lora, tokenizer_dir)
    hf_config, hf_params = load_hf_params(hf_dir)
    before = forward(params, config, ids[None], lora_params=lora_params, lora=lora).logits_BxTxV
    after = forward(hf_params, hf_config, ids[None]).logits_BxTxV
    diff = float(jnp.max(jnp.abs(before - after)))
    print(f"[5/5] saved {policy_dir}; exported {hf_dir} (LoRA merged); re-imported max |Δlogit| = {diff:.2e}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "reply_matches": reply == REPLY,
            "export_max_abs_diff": diff, "seconds": time.time() - started}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m jaxagent.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the tokenizer, checkpoint and export")
    parser.add_argument("--steps", type=int, default=60, help="behaviour-cloning steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"--steps={args.steps} must be at least 1")
    result = run_demo(Path(args.out), args.steps, args.seed)
    print(f"done in {result['seconds']:.0f}s")
    return 0 if result["reply_matches"] and result["export_max_abs_diff"] < 1e-4 else 1


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(run_main(main))
