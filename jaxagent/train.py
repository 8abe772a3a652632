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

from jaxagent import compiling, distributed
from jaxagent.algorithms import get_stage_runner
from jaxagent.algorithms.common import PolicyParams, Setup
from jaxagent.atomic import staged_file
from jaxagent.checkpoint import Policy, is_policy_folder, save_policy
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
from jaxagent.placement import Placement
from jaxagent.sampling import Sampler
from jaxagent.sharding import MeshConfig, leaf_sharding_fn
from jaxagent.tokens import ChatRenderer

log = logging.getLogger("jaxagent.train")


def build_setup(config: TrainConfig, check_config: bool = True) -> tuple[Setup, PolicyParams]:
    """The run folder, environment, tokenizer, model and sampler of a run, and its initial policy.

    `check_config`: refuse a run folder that holds another configuration (off for `jaxagent.evaluate`).
    """
    start = start_policy(config.init_from)
    folder = start / "model" if start is not None else model_folder(config.model)
    mesh_config = MeshConfig(**shared_fields(config.mesh, MeshConfig))
    if jax.device_count() > 1:
        mesh_config.resolve(jax.device_count())  # a mesh these devices cannot form fails now, before any work
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
    tokenizer, tokenizer_dir = policy_tokenizer(config, folder, run_dir, make_env)
    model = policy_model(config, folder, len(tokenizer))
    placement = Placement.for_devices(model, lora, mesh_config)
    log.info("devices: %s", placement.describe())
    if start is not None:
        params, lora_params = placement.load_policy(start)
        check_lora_matches(start, lora, lora_params)
    else:
        params = load_params(folder, model, placement) if folder is not None else placement.init_params(key)
        lora_params = placement.init_lora(jax.random.fold_in(key, 1)) if lora is not None else None
    renderer = ChatRenderer(tokenizer)
    sampler = Sampler(model, max_len=config.rollout.max_context, lora=lora, tokenizer=tokenizer,
                      mesh=placement.sample_mesh, grow_cache=config.rollout.grow_cache,
                      min_prefill_rows=config.rollout.min_prefill_rows)
    service = envs.start_service(env.name, env.options, config.rollout.max_concurrent)
    setup = Setup(config, model, lora, Path(tokenizer_dir), renderer, make_env, sampler, run_dir,
                  MetricsLog(run_dir, writes=distributed.is_first()), placement, service)
    return setup, PolicyParams(params, lora_params)


def start_policy(init_from: str) -> Path | None:
    """The policy folder `init_from` names (a finished stage's folder holds it in policy/), checked to exist."""
    if not init_from:
        return None
    path = Path(init_from)
    for folder in (path / "policy", path):
        if is_policy_folder(folder):
            return folder.absolute()
    raise ConfigError(f"init_from={init_from!r} is neither a finished stage's folder (RUN/stages/NAME with a policy/ "
                      "inside) nor a jaxagent policy folder")


def check_lora_matches(start: Path, lora: LoraConfig | None, lora_params: dict | None) -> None:
    """A run continues the adapters it starts from: both use LoRA, or neither."""
    if (lora is None) != (lora_params is None):
        saved = "LoRA adapters" if lora_params is not None else "no LoRA adapters"
        raise ConfigError(f"init_from={str(start)!r} holds {saved} but lora.enabled={lora is not None}; set "
                          f"lora.enabled={lora_params is not None}")


def policy_tokenizer(config: TrainConfig, folder: Path | None, run_dir: Path, make_env):
    """(tokenizer, its folder): the Hugging Face folder's, or one trained locally for a model from scratch."""
    if folder is None:
        return local_tokenizer(config, run_dir, make_env)
    from jaxagent.local_tokenizer import load_tokenizer

    return load_tokenizer(folder), folder


def policy_model(config: TrainConfig, folder: Path | None, vocab_size: int) -> ModelConfig:
    """The policy's architecture: the Hugging Face folder's config.json with the run's dtypes and kernels, or the
    model section's shapes for a model from scratch."""
    if folder is None:
        return scratch_model(config.model, vocab_size, config.rollout.max_context)
    return ModelConfig.from_hf_dir(folder, **config.model.compute)


def load_params(folder: Path, model: ModelConfig, placement: Placement) -> dict:
    """The Hugging Face weights, each tensor written straight into its shards (no host holds the whole model)."""
    from jaxagent.models.hf import load_hf_params

    shardings = placement.param_shardings()
    _, params = load_hf_params(folder, model, shardings=None if shardings is None else leaf_sharding_fn(shardings[0]))
    return params


def scratch_model(section: ModelSection, vocab_size: int, max_context: int) -> ModelConfig:
    """The decoder of a model trained from scratch: the section's shapes, tied embeddings, Qwen2's q/k/v bias."""
    shapes = shared_fields(section, ModelConfig)
    dtypes = {name: shapes.pop(name) for name in ("dtype", "param_dtype")}
    return ModelConfig(**{**shapes, "vocab_size": vocab_size}, qkv_bias=section.family == "qwen2",
                       tie_word_embeddings=True, max_position_embeddings=max(max_context, 2048)).replace(**dtypes)


def local_tokenizer(config: TrainConfig, run_dir: Path, make_env):
    """The run's tokenizer for a model from scratch: trained once on expert episodes' text, then reused."""
    from jaxagent.data import expert_demonstrations
    from jaxagent.local_tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    folder = run_dir / "tokenizer"

    def train_and_save() -> None:
        tasks = envs.list_tasks(config.env.name, config.env.train_split, config.env.options)
        played = expert_demonstrations(make_env, tasks, config.model.tokenizer_demos, config.sft.mistake_rate,
                                       seed=config.seed + 1)
        texts = [m["content"] for messages, _ in played for m in messages]
        staging = run_dir / ".tokenizer.partial"
        save_tokenizer(train_tokenizer(texts, vocab_size=config.model.vocab_size), staging)
        staging.replace(folder)

    distributed.written_by_first(folder, train_and_save)  # every process then reads the same files
    return load_tokenizer(folder), folder


def check_same_config(run_dir: Path, config: TrainConfig) -> None:
    """A run folder belongs to one configuration: resuming with another would mix two runs."""
    path = run_dir / "config.yaml"
    if distributed.first_says(path.is_file()):
        import yaml

        saved = yaml.safe_load(path.read_text())
        current = to_dict(config)
        # Where a run runs (its mesh) and how it reports progress do not change what it computes.
        for key in ("progress", "mesh"):
            saved.pop(key, None), current.pop(key, None)
        if saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ConfigError(f"run folder {str(run_dir)!r} holds a run with a different configuration (differs in: "
                              f"{', '.join(changed)}); set run_dir=... to a new folder, or delete that one")
    else:
        distributed.written_by_first(path, lambda: save_resolved(config, run_dir))


def run_stages(setup: Setup, policy: PolicyParams) -> dict:
    """Run (or skip, when already finished) every stage; returns {stage: held-out statistics}."""
    results = {}
    for index, name in enumerate(setup.config.stages):
        stage_dir = setup.run_dir / "stages" / name
        result_file = stage_dir / "result.json"
        if result_file.is_file() and is_policy_folder(stage_dir / "policy"):
            policy = PolicyParams(*setup.placement.load_policy(stage_dir / "policy"))
            results[name] = json.loads(result_file.read_text())
            log.info("stage %s already finished; skipped", name)
            continue
        policy, stats = get_stage_runner(name)(setup, index, name, policy)
        policy_dir = stage_dir / "policy"
        if policy_dir.exists() and distributed.is_first():  # left by a crash between the policy and its result
            shutil.rmtree(policy_dir)
        distributed.barrier(f"clear {policy_dir}")
        save_policy(policy_dir, Policy(setup.model, policy.params, setup.lora, policy.lora_params,
                                       setup.tokenizer_dir))
        if distributed.is_first():
            with staged_file(result_file) as tmp:
                tmp.write_text(json.dumps(stats, indent=2) + "\n")
        distributed.barrier(f"finished {stage_dir}")
        results[name] = stats
    return results


def finish(setup: Setup, results: dict) -> dict:
    """summary.json, reward.png and the final table."""
    if not distributed.is_first():  # process 0 reports for the run
        return {}
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
    compiling.prepare()  # before the first JAX computation
    distributed.initialize()  # a multi-host launch (launch/) sets JAXAGENT_DISTRIBUTED or the coordinator variables
    config = load_config(args.config, args.overrides)
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
