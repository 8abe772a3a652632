"""Train an agent: `python -m jaxagent.train [--config NAME|PATH] [key=value ...]` (default config: tiny).

A run is a list of stages (e.g. sft then loop); each starts from the previous stage's policy. Everything lands in
the run folder:

    config.yaml        the resolved configuration (a restart must use the same one)
    tokenizer/         the tokenizer trained locally (models from scratch)
    checkpoints/STAGE  orbax train-state checkpoints, the last `checkpoint.keep` of each stage
    stages/STAGE/      each finished stage: its policy (jaxagent checkpoint) and result.json
    metrics.jsonl, tensorboard/, reward.png, summary.json

Restarting the same command in the same folder resumes from the last checkpoint; finished stages are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import jax

from jaxagent.algorithms import get_stage_runner
from jaxagent.algorithms.common import PolicyParams, Setup
from jaxagent.atomic import staged_file
from jaxagent.checkpoint import Policy, is_policy_folder, load_policy, save_policy
from jaxagent.config import (
    DEFAULT_CONFIG,
    ConfigError,
    ModelSection,
    TrainConfig,
    load_config,
    model_folder,
    save_resolved,
    shared_fields,
    to_dict,
)
from jaxagent.envs import registry as envs
from jaxagent.errors import run_main
from jaxagent.metrics import MetricsLog, final_table, plot_rewards
from jaxagent.models.config import ModelConfig
from jaxagent.models.lora import LoraConfig
from jaxagent.models.transformer import init_params
from jaxagent.sampling import Sampler
from jaxagent.sharding import initialize_distributed
from jaxagent.tokens import ChatRenderer

log = logging.getLogger("jaxagent.train")


def build_setup(config: TrainConfig, check_config: bool = True) -> tuple[Setup, PolicyParams]:
    """The run folder, environment, tokenizer, model and sampler of a run, and its initial policy.

    `check_config`: refuse a run folder that holds another configuration (off for `jaxagent.evaluate`).
    """
    folder = model_folder(config.model)
    env = config.env
    envs.list_tasks(env.name, env.train_split, env.options)  # a bad split fails now, not after the first stage
    envs.list_tasks(env.name, config.eval.split or env.eval_split, env.options)
    run_dir = config.directory.absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    if check_config:
        check_same_config(run_dir, config)

    service = None  # started last: nothing above may fail and leave its processes running

    def make_env(task_id: str, seed: int):
        return envs.make_env(env.name, task_id, seed, service, **env.options)

    lora = LoraConfig(**shared_fields(config.lora, LoraConfig)) if config.lora.enabled else None
    key = jax.random.key(config.seed)
    model, params, tokenizer, tokenizer_dir = policy_model(config, folder, run_dir, make_env, key)
    lora_params = None
    if lora is not None:
        # Only the adapters are materialised: XLA drops the unused random base weights.
        lora_params = jax.jit(lambda k: init_params(model, k, lora)[1])(jax.random.fold_in(key, 1))
    renderer = ChatRenderer(tokenizer)
    sampler = Sampler(model, max_len=config.rollout.max_context, lora=lora, tokenizer=tokenizer)
    service = envs.start_service(env.name, env.options, config.rollout.max_concurrent)
    setup = Setup(config, model, lora, Path(tokenizer_dir), renderer, make_env, sampler, run_dir,
                  MetricsLog(run_dir), service)
    return setup, PolicyParams(params, lora_params)


def policy_model(config: TrainConfig, folder: Path | None, run_dir: Path, make_env, key: jax.Array):
    """(model config, parameters, tokenizer, tokenizer folder): a Hugging Face folder's, or a new decoder's with a
    tokenizer trained locally."""
    if folder is not None:
        from transformers import AutoTokenizer

        from jaxagent.models.hf import load_hf_params

        model, params = load_hf_params(folder, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                                       remat=config.model.remat, attention=config.model.attention,
                                       attention_block=config.model.attention_block)
        return model, params, AutoTokenizer.from_pretrained(str(folder)), folder
    tokenizer, tokenizer_dir = local_tokenizer(config, run_dir, make_env)
    model = scratch_model(config.model, len(tokenizer), config.rollout.max_context)
    params, _ = init_params(model, key)
    return model, params, tokenizer, tokenizer_dir


def scratch_model(section: ModelSection, vocab_size: int, max_context: int) -> ModelConfig:
    """The decoder of a model trained from scratch: the section's shapes, tied embeddings, Qwen2's q/k/v bias."""
    shapes = shared_fields(section, ModelConfig)
    dtypes = {name: shapes.pop(name) for name in ("dtype", "param_dtype")}
    return ModelConfig(**{**shapes, "vocab_size": vocab_size}, qkv_bias=section.family == "qwen2",
                       tie_word_embeddings=True, max_position_embeddings=max(max_context, 2048)).replace(**dtypes)


def local_tokenizer(config: TrainConfig, run_dir: Path, make_env):
    """The run's tokenizer for a model from scratch: trained once on expert episodes' text, then reused."""
    from transformers import AutoTokenizer

    from jaxagent.data import expert_demonstrations
    from jaxagent.local_tokenizer import save_tokenizer, train_tokenizer

    folder = run_dir / "tokenizer"
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder)), folder
    tasks = envs.list_tasks(config.env.name, config.env.train_split, config.env.options)
    played = expert_demonstrations(make_env, tasks, config.model.tokenizer_demos, config.sft.mistake_rate,
                                   seed=config.seed + 1)
    texts = [m["content"] for messages, _ in played for m in messages]
    tokenizer = train_tokenizer(texts, vocab_size=config.model.vocab_size)
    staging = run_dir / ".tokenizer.partial"
    save_tokenizer(tokenizer, staging)
    staging.replace(folder)
    return tokenizer, folder


def check_same_config(run_dir: Path, config: TrainConfig) -> None:
    """A run folder belongs to one configuration: resuming with another would mix two runs."""
    path = run_dir / "config.yaml"
    if path.is_file():
        import yaml

        saved = yaml.safe_load(path.read_text())
        current = to_dict(config)
        saved.pop("progress", None), current.pop("progress", None)
        if saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ConfigError(f"run folder {str(run_dir)!r} holds a run with a different configuration (differs in: "
                              f"{', '.join(changed)}); set run_dir=... to a new folder, or delete that one")
    else:
        save_resolved(config, run_dir)


def run_stages(setup: Setup, policy: PolicyParams) -> dict:
    """Run (or skip, when already finished) every stage; returns {stage: held-out statistics}."""
    results = {}
    for index, name in enumerate(setup.config.stages):
        stage_dir = setup.run_dir / "stages" / name
        result_file = stage_dir / "result.json"
        if result_file.is_file() and is_policy_folder(stage_dir / "policy"):
            saved = load_policy(stage_dir / "policy")
            policy = PolicyParams(saved.params, saved.lora_params)
            results[name] = json.loads(result_file.read_text())
            log.info("stage %s already finished; skipped", name)
            continue
        policy, stats = get_stage_runner(name)(setup, index, name, policy)
        policy_dir = stage_dir / "policy"
        if policy_dir.exists():  # left by a crash between saving the policy and its result
            shutil.rmtree(policy_dir)
        save_policy(policy_dir, Policy(setup.model, policy.params, setup.lora, policy.lora_params,
                                       setup.tokenizer_dir))
        with staged_file(result_file) as tmp:
            tmp.write_text(json.dumps(stats, indent=2) + "\n")
        results[name] = stats
    return results


def finish(setup: Setup, results: dict) -> dict:
    """summary.json, reward.png and the final table."""
    summary = {"config": setup.config.name, "seed": setup.config.seed,
               "stages": {name: {"eval_success": stats["success"], "eval_reward": stats["reward"],
                                 "eval_episodes": stats["episodes"], "eval_turns": stats["turns"]}
                          for name, stats in results.items()},
               "seconds": round(time.time() - setup.started, 1)}
    with staged_file(setup.run_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    plot_rewards(setup.metrics.records(), setup.run_dir / "reward.png")
    print(f"\nheld-out evaluation ({setup.config.env.name}, split "
          f"{setup.config.eval.split or setup.config.env.eval_split}):")
    print(final_table(results))
    print(f"run folder: {setup.run_dir}  (summary.json, reward.png, metrics.jsonl, tensorboard/)")
    return summary


def train(config: TrainConfig) -> dict:
    """Run every stage of `config` (resuming where a previous attempt stopped); returns the summary."""
    setup, policy = build_setup(config)
    try:
        results = run_stages(setup, policy)
        return finish(setup, results)
    finally:
        setup.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxagent.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a name in configs/ or a .yaml path")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. loop.rollouts_per_task=4 optim.lr=1e-5")
    args = parser.parse_args(argv)
    initialize_distributed()  # a multi-host launch (launch/) sets JAXAGENT_DISTRIBUTED or the coordinator variables
    config = load_config(args.config, args.overrides)
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
