"""Training configurations: YAML files in `configs/`, dotted command-line overrides, typed frozen dataclasses.

    python -m jaxagent.train --config tiny loop.rollouts_per_task=4 optim.lr=1e-5

A file may name another with `base: NAME` and change only what differs. Every key is checked against the
dataclasses below: an unknown key, a value of the wrong type or an impossible combination raises ConfigError, whose
one-line message names the key and what would be valid. The resolved configuration is written to the run folder.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from jaxagent import choices
from jaxagent.errors import UserError, check_choice

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny"
RL_STAGES, STAGES = choices.RL_STAGES, choices.STAGES
TRUNCATION_NOTE = "Execution output is too long and is not fully shown."


class ConfigError(UserError):
    """A configuration that cannot run; the message names the key and what is valid."""


def check_sampling(section: str, temperature: float, top_p: float, top_k: int, error: type[Exception]) -> None:
    """A section's sampling settings, in the words of `jaxagent.sampling.SamplingParams` (which needs JAX)."""
    if temperature < 0:
        raise error(f"{section}.temperature={temperature} must be >= 0 (0 decodes greedily)")
    if not 0 < top_p <= 1:
        raise error(f"{section}.top_p={top_p} must be in (0, 1] (1: off)")
    if top_k < 0:
        raise error(f"{section}.top_k={top_k} must be >= 0 (0: off)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping (LOOP: lr 5e-5 constant, weight decay 0.01, clip 1)."""

    lr: float = 5e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0  # for linear/cosine decay
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_choice(self.schedule, choices.SCHEDULES, "optim.schedule", ConfigError)
        if self.schedule != "constant" and self.total_steps <= 0:
            raise ConfigError(f"optim.schedule={self.schedule!r} needs optim.total_steps > 0")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            raise ConfigError(f"optim.lr={self.lr} and optim.max_grad_norm={self.max_grad_norm} must be > 0")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} and optim.warmup_steps={self.warmup_steps} "
                              "must be >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1) or self.eps <= 0:
            raise ConfigError(f"optim.b1={self.b1} and optim.b2={self.b2} must be in [0, 1), optim.eps={self.eps} "
                              "> 0")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Episode limits and how collection is scheduled (defaults: LOOP's AppWorld settings)."""

    max_turns: int = 40
    max_tokens_per_turn: int = 1500
    max_context: int = 32768
    max_observation_tokens: int = 3000
    truncation_note: str = TRUNCATION_NOTE
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    decode_chunk: int = 64  # tokens decoded between two looks at the environments
    max_concurrent: int = 64  # episodes (sampler rows) alive at once
    # The fewest rows one prefill (prompts or observations written into the cache) computes, the others idle: each
    # row count is a program to compile, so a small model saves compile time at little cost; a large one would
    # compute idle rows of long prompts.
    min_prefill_rows: int = 1
    env_workers: int = 8
    env_timeout_s: float = 120.0
    early_stop_fraction: float = 0.0  # LOOP: 0.9 -- end the round when this fraction is done ...
    early_stop_min_per_task: int = 0  # ... and every task has at least this many finished rollouts (LOOP: 4)
    # Wait for every environment step before decoding again: slower, but the round no longer depends on how fast
    # each environment answered, so a run (and a run resumed from a checkpoint) repeats exactly.
    deterministic: bool = False
    # The sampler's KV cache starts as long as the episodes need and grows in length buckets as they get longer,
    # instead of holding max_context slots per live episode from the start (same tokens either way).
    grow_cache: bool = False
    # The most KV cache the sampler may hold, in GiB per device (0: no budget, room for max_concurrent episodes of
    # max_context tokens). Episodes are admitted first come, first served while their cache fits; when growing
    # episodes outgrow it, the latest admitted are parked (their cache dropped) and rejoin later, re-reading their
    # context. The cache grows and shrinks with the episodes (as with grow_cache).
    kv_cache_gb: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens_per_turn", "max_context", "max_observation_tokens", "decode_chunk",
                     "max_concurrent", "min_prefill_rows", "env_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name}={getattr(self, name)} must be >= 1")
        if self.kv_cache_gb < 0:
            raise ValueError(f"rollout.kv_cache_gb={self.kv_cache_gb} must be >= 0 (0: no budget)")
        # The sampler checks these too, but only when the first episode starts: after SFT, minutes or hours in.
        check_sampling("rollout", self.temperature, self.top_p, self.top_k, ValueError)
        if self.env_timeout_s <= 0:
            raise ValueError(f"rollout.env_timeout_s={self.env_timeout_s} must be > 0")
        if not 0.0 <= self.early_stop_fraction <= 1.0:
            raise ValueError(f"rollout.early_stop_fraction={self.early_stop_fraction} must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The policy: a Hugging Face folder, or (no folder) a decoder initialised from scratch with these shapes."""

    path: str = ""  # Hugging Face model folder (config.json, safetensors, tokenizer)
    path_env: str = ""  # environment variable that holds the folder when `path` is empty
    family: str = "qwen2"
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    dtype: str = "float32"  # compute dtype; float64 (with JAX_ENABLE_X64=1) for reference runs: no float32 step
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "blockwise"  # blockwise (memory linear in T; cuDNN on a GPU where it applies) | dense
    attention_block: int = 512  # query and key block of the blockwise kernel (training, log-probs)
    sampling_block: int = 0  # the block while sampling over the KV cache; 0: attention_block
    vocab_size: int = 1024  # of the tokenizer trained locally for a model from scratch
    tokenizer_demos: int = 200  # expert episodes whose text trains that tokenizer
    shapes: str = ""  # built-in shapes (jaxagent.plan) for planning memory without the weights, e.g. qwen2.5-32b

    @property
    def from_scratch(self) -> bool:
        return not self.path and not self.path_env

    @property
    def compute(self) -> dict:
        """The settings a pretrained model's ModelConfig takes from this section (dtypes, remat, attention kernel)."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, attention=self.attention,
                    attention_block=self.attention_block, sampling_block=self.sampling_block)


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """LoRA adapters (LOOP: r=16, alpha=32 on attention and MLP projections); off trains every parameter."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = choices.LORA_TARGETS


@dataclasses.dataclass(frozen=True)
class EnvSection:
    """Which environment and which of its splits train and evaluate."""

    name: str = "apptown"
    train_split: str = "train"
    eval_split: str = "test"
    options: dict = dataclasses.field(default_factory=dict)  # passed to the environment's constructor


@dataclasses.dataclass(frozen=True)
class SftSection:
    """Behaviour cloning on expert trajectories: the environment's expert, or a JSONL file of conversations."""

    data: str = "expert"  # "expert", or a path to a JSONL file with one {"messages": [...]} per line
    demos: int = 400  # expert episodes (one per training task, cycling)
    mistake_rate: float = 0.0  # the expert's rate of each mistake kind (mixed-quality demonstrations)
    epochs: int = 3  # at most; with stop_loss, training may end sooner
    # End training at the first log point whose mean loss (over the last `log_every` steps) is below this; 0 trains
    # every epoch. A model from scratch learns to copy names from the task in a sudden loss drop whose step varies
    # with the seed; stopping on the loss trains each seed until it got there, not a fixed number of steps.
    stop_loss: float = 0.0
    batch_size: int = 16
    group_by_length: bool = False  # batch demonstrations of similar length (less padding; see algorithms/sft.py)
    pack: bool = False  # pack each batch's demonstrations into shared rows (jaxagent.packing); see LoopSection.pack
    per: str = "token"  # loss mean over all model tokens ("token") or per trajectory first ("trajectory")
    log_every: int = 10  # steps per metrics record
    checkpoint_every: int = 50  # steps per checkpoint
    optim: OptimConfig = OptimConfig(lr=1e-3, weight_decay=0.0, max_grad_norm=1.0)


@dataclasses.dataclass(frozen=True)
class LoopSection:
    """An RL stage (`loop` and its siblings): tasks, rollouts, advantages, filter, epochs of minibatch updates."""

    iterations: int = 200
    tasks_per_iteration: int = 40
    rollouts_per_task: int = 6
    epochs: int = 2
    minibatch_size: int = 32
    micro_batches: int = 1
    # Pack each minibatch's rollouts into shared rows instead of padding each to the longest (jaxagent.packing): the
    # same losses and gradients on fewer tokens. Off by default: on a GPU, unpacked rows run cuDNN's fused attention,
    # packed rows the portable blockwise kernel.
    pack: bool = False
    min_abs_advantage: float = 0.01  # rollouts with |A| below this are dropped (loop, rloo, grpo)
    epsilon: float = 0.1
    clip: str = "asymmetric"
    ratio_level: str = "token"  # loop: token; ablations: turn, trajectory ("bandit")
    # The trajectory advantage: "" = the stage's own (loop, rloo: leave_one_out; grpo: group_norm; reinforce: reward),
    # or any estimator name, e.g. leave_one_out_norm for LOOP's "RwNorm" ablation (divided by the group's reward std).
    advantage: str = ""
    kl_coef: float = 0.0
    value_coef: float = 0.1  # ppo: value-loss weight, decayed linearly to value_coef_end
    value_coef_end: float = 0.001
    critic_warmup_iterations: int = 10  # ppo: iterations that train only the value head
    ei_filter: str = "best_of_group"  # ei: which rollouts to imitate (best_of_group | success)
    # Runaway guard (LOOP's reference: 20): an iteration's updates stop at the first minibatch whose KL estimate to
    # the policy that sampled it, -mean over rollouts of sum_t (log π_new - log π_old), exceeds this; 0 = off.
    kl_stop: float = 0.0


@dataclasses.dataclass(frozen=True)
class EtoSection:
    """ETO (Trial and Error): iterations of explore -> pairs against the expert -> trajectory DPO (defaults: the
    paper's). Iteration i uses betas[i] and lrs[i] (the last entry repeats); each iteration's DPO starts a fresh
    AdamW, constant LR after a linear warm-up over `warmup_fraction` of its steps, and its reference is the policy at
    the iteration's start."""

    iterations: int = 3
    betas: tuple[float, ...] = (0.1, 0.5, 0.5)
    lrs: tuple[float, ...] = (1e-6, 5e-7, 5e-7)
    epochs: int = 3
    batch_size: int = 32  # pairs per update
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    explore_temperature: float = 0.0  # the public script explores greedily
    explore_tasks: int = 0  # training tasks explored per iteration (0: all, once each)
    extra_turns: int = 5  # a rejected failure is cut to the expert's agent turns + this; -1 keeps it whole
    contrast: str = "trajectory"

    def beta(self, iteration: int) -> float:
        return self.betas[min(iteration, len(self.betas)) - 1]

    def lr(self, iteration: int) -> float:
        return self.lrs[min(iteration, len(self.lrs)) - 1]


@dataclasses.dataclass(frozen=True)
class CollectSection:
    """Offline data for SWEET-RL: the current policy plays each training task `rollouts_per_task` times and the
    episodes are saved with each task's training-time information (the environment's hidden reference)."""

    rollouts_per_task: int = 3
    tasks: int = 0  # training tasks played (0: all; else the first N of a seeded shuffle)
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class CriticSection:
    """SWEET-RL's critic: Bradley-Terry on pairs of offline trajectories of the same task, reading each task's
    training-time information (`use_info`) before the dialogue. Defaults: the paper's (beta 0.1, lr 2e-7, 4 epochs
    of 8 pairs, the per-turn score)."""

    data: str = ""  # a trajectories.jsonl; empty: this run's collect stage's
    use_info: bool = True  # false: the ablation whose critic sees only what the agent saw
    score: str = "turn_sum"  # "turn_sum" (the paper) or "trajectory_mean" (the public code)
    beta: float = 0.1
    lr: float = 2e-7
    epochs: int = 4
    batch_size: int = 8
    held_out: float = 0.1  # fraction of the paired tasks kept out of training, for held-out pair accuracy
    # Held-out trajectories whose last turn is replayed with the critic's pick among `candidates` policy replies
    # (reported beside a random pick's expected success); 0: none.
    replay: int = 16
    candidates: int = 16
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class DpoSection:
    """Multi-turn DPO on offline pairs (SWEET-RL's baseline): the same pairs as the critic's, trained on the agent's
    own view with trajectory-level sigmoid DPO against the policy as the stage starts."""

    data: str = ""  # a trajectories.jsonl; empty: this run's collect stage's
    level: str = "trajectory"
    beta: float = 0.1
    lr: float = 2e-7
    epochs: int = 1
    batch_size: int = 8
    nll_coef: float = 0.01  # NLL on the chosen side, as SWEET-RL's DPO runs
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class SweetSection:
    """SWEET-RL's policy step: at each agent turn of the offline trajectories the policy samples `candidates`
    replies, the critic ranks them, and turn-level DPO trains on `pairs_per_turn` pairs of a random top-half reply
    against a random bottom-half one, on the agent's view, against the policy as the stage starts."""

    data: str = ""  # a trajectories.jsonl; empty: this run's collect stage's
    critic: str = ""  # a finished critic stage's folder (RUN/stages/critic); empty: this run's
    trajectories: int = 0  # offline trajectories used (0: all; else the first N of a seeded shuffle)
    candidates: int = 16
    pairs_per_turn: int = 4
    temperature: float = 1.0
    beta: float = 0.1
    lr: float = 2e-7
    epochs: int = 1
    batch_size: int = 8
    nll_coef: float = 0.01
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out evaluation: every `every` iterations of an RL stage, and at the end of every stage."""

    every: int = 10
    split: str = ""  # empty: env.eval_split
    tasks: int = 0  # 0: every task of the split
    rollouts_per_task: int = 1
    temperature: float = 1.0  # 0 decodes greedily (LOOP's reference evaluates so, with 2 rollouts per task)
    top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Train-state checkpoints (orbax) every `every` iterations and at the end of each stage; the last `keep` stay."""

    every: int = 5
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """How the devices of the run form a mesh: `data` (data parallel), `fsdp` (data parallel with parameters and
    optimizer state split) and `tensor` (heads and MLP width split). One axis may be -1: all devices the others
    leave. With one device there is no mesh at all; on several, every stage runs sharded over this mesh."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        bad = [f"mesh.{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
        if bad or list(sizes.values()).count(-1) > 1:
            raise ValueError(f"{', '.join(bad) or 'mesh'}: axis sizes must be positive, with at most one -1 "
                             f"(got data={self.data}, fsdp={self.fsdp}, tensor={self.tensor})")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole run."""

    name: str = "run"
    run_dir: str = ""  # empty: runs/<name>
    seed: int = 0
    stages: tuple[str, ...] = ("sft", "loop")
    # Start from another run's finished stage (RUN/stages/NAME) or a policy folder instead of model.path / a fresh
    # model: its weights, adapters, architecture and tokenizer (so methods compared can share one SFT policy).
    init_from: str = ""
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    env: EnvSection = EnvSection()
    rollout: RolloutConfig = RolloutConfig()
    sft: SftSection = SftSection()
    loop: LoopSection = LoopSection()
    eto: EtoSection = EtoSection()
    collect: CollectSection = CollectSection()
    critic: CriticSection = CriticSection()
    dpo: DpoSection = DpoSection()
    sweet: SweetSection = SweetSection()
    optim: OptimConfig = OptimConfig()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()
    progress: bool = True  # progress bars on the terminal

    @property
    def directory(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


# ---- loading ------------------------------------------------------------------------------------------------------

def config_path(name_or_path: str) -> Path:
    """A config file from a name in configs/ (`tiny`) or a path (`my.yaml`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown config {name_or_path!r}; valid names: {', '.join(available_configs())} "
                          "(or a path to a .yaml file)")
    return candidate


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_raw(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict:
    """The file's mapping merged over its `base` chain (nested mappings merge key by key)."""
    path = config_path(name_or_path)
    if str(path.resolve()) in _seen:
        raise ConfigError(f"config {str(path)!r} names itself as a base (cycle: {' -> '.join(_seen)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return merge(load_raw(str(base), _seen + (str(path.resolve()),)), raw)


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """`a.b=value` items set nested keys; values are YAML (`1e-5`, `true`, `[sft, loop]`)."""
    out = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-5)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else ({} if child is None else child)
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return out


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Dataclass `cls` from a mapping, checking every key and type."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        raise ConfigError(f"unknown key {prefix + str(unknown[0])!r}; valid keys of {where}: {', '.join(fields)}")
    values = {key: _coerce(hints[key], value, prefix + key) for key, value in raw.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _coerce(kind: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return build(kind, value, key + ".")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-5 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(kind)[0]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if kind is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        return value
    raise ConfigError(f"{key}: unsupported type {kind}")


def load_config(name_or_path: str = DEFAULT_CONFIG, overrides: Sequence[str] = ()) -> TrainConfig:
    """The validated configuration of a file plus command-line overrides."""
    raw = apply_overrides(load_raw(name_or_path), overrides)
    raw.setdefault("name", Path(name_or_path).stem)
    config = build(TrainConfig, raw)
    validate(config)
    return config


def _validate_sft_stop(sft: SftSection) -> None:
    if sft.stop_loss < 0:
        raise ConfigError(f"sft.stop_loss={sft.stop_loss} must be >= 0 (0 trains every epoch)")
    # A resumed run then starts on a whole window of losses, so it stops where an uninterrupted run would.
    if sft.stop_loss > 0 and sft.checkpoint_every % sft.log_every:
        raise ConfigError(f"sft.stop_loss needs sft.checkpoint_every={sft.checkpoint_every} to be a multiple of "
                          f"sft.log_every={sft.log_every}")


def _validate_eto(eto: EtoSection) -> None:
    for key in ("iterations", "epochs", "batch_size"):
        if getattr(eto, key) < 1:
            raise ConfigError(f"eto.{key}={getattr(eto, key)} must be >= 1")
    if not eto.betas or not eto.lrs or min(eto.betas) <= 0 or min(eto.lrs) <= 0:
        raise ConfigError(f"eto.betas={list(eto.betas)} and eto.lrs={list(eto.lrs)} must be non-empty lists of "
                          "positive numbers")
    if not 0.0 <= eto.warmup_fraction < 1.0 or eto.explore_temperature < 0 or eto.explore_tasks < 0:
        raise ConfigError(f"eto.warmup_fraction={eto.warmup_fraction} must be in [0, 1), eto.explore_temperature="
                          f"{eto.explore_temperature} and eto.explore_tasks={eto.explore_tasks} >= 0")
    if eto.extra_turns < -1:
        raise ConfigError(f"eto.extra_turns={eto.extra_turns} must be >= 0, or -1 to keep failures whole")
    check_choice(eto.contrast, choices.ETO_CONTRASTS, "eto.contrast", ConfigError)


def _validate_collect(collect: CollectSection) -> None:
    if collect.rollouts_per_task < 1 or collect.tasks < 0 or collect.temperature < 0:
        raise ConfigError(f"collect.rollouts_per_task={collect.rollouts_per_task} must be >= 1, collect.tasks="
                          f"{collect.tasks} and collect.temperature={collect.temperature} >= 0")


def _validate_loop_coefficients(loop: LoopSection) -> None:
    # epsilon 0 clips every ratio to 1 (no gradient); a symmetric clip at epsilon >= 1 has no lower bound.
    if loop.epsilon <= 0 or (loop.clip == "symmetric" and loop.epsilon >= 1):
        valid = "in (0, 1) with loop.clip=symmetric" if loop.clip == "symmetric" else "> 0"
        raise ConfigError(f"loop.epsilon={loop.epsilon} must be {valid}")
    for key in ("min_abs_advantage", "kl_coef", "value_coef", "value_coef_end", "critic_warmup_iterations"):
        if getattr(loop, key) < 0:
            raise ConfigError(f"loop.{key}={getattr(loop, key)} must be >= 0")


def _validate_advantage(advantage: str, rl_stages: list[str]) -> None:
    if not advantage:
        return
    check_choice(advantage, choices.ADVANTAGES, "loop.advantage", ConfigError)
    fixed = [s for s in rl_stages if s in ("ppo", "ei")]
    if fixed:
        raise ConfigError(f"loop.advantage={advantage!r} does not apply to stage {fixed[0]} (ppo's advantages come "
                          "from its value head, ei imitates); it sets loop, grpo, rloo and reinforce's")


def _validate_critic(critic: CriticSection) -> None:
    if critic.epochs < 1 or critic.batch_size < 1 or critic.beta <= 0 or critic.lr <= 0:
        raise ConfigError(f"critic.epochs={critic.epochs} and critic.batch_size={critic.batch_size} must be >= 1, "
                          f"critic.beta={critic.beta} and critic.lr={critic.lr} > 0")
    if not 0.0 <= critic.held_out < 1.0 or not 0.0 <= critic.warmup_fraction < 1.0:
        raise ConfigError(f"critic.held_out={critic.held_out} and critic.warmup_fraction={critic.warmup_fraction} "
                          "must be in [0, 1)")
    check_choice(critic.score, choices.CRITIC_SCORES, "critic.score", ConfigError)
    if critic.replay < 0 or critic.candidates < 2:
        raise ConfigError(f"critic.replay={critic.replay} must be >= 0 and critic.candidates={critic.candidates} >= 2")


def _validate_sweet(sweet: SweetSection) -> None:
    if sweet.candidates < 2 or not 1 <= sweet.pairs_per_turn <= sweet.candidates // 2:
        raise ConfigError(f"sweet.candidates={sweet.candidates} must be >= 2 and sweet.pairs_per_turn="
                          f"{sweet.pairs_per_turn} in [1, candidates // 2] (each pair takes one reply from each half)")
    if sweet.epochs < 1 or sweet.batch_size < 1 or sweet.beta <= 0 or sweet.lr <= 0 or sweet.nll_coef < 0:
        raise ConfigError(f"sweet.epochs={sweet.epochs} and sweet.batch_size={sweet.batch_size} must be >= 1, "
                          f"sweet.beta={sweet.beta} and sweet.lr={sweet.lr} > 0, sweet.nll_coef={sweet.nll_coef} >= 0")
    if sweet.trajectories < 0 or sweet.temperature <= 0 or not 0.0 <= sweet.warmup_fraction < 1.0:
        raise ConfigError(f"sweet.trajectories={sweet.trajectories} must be >= 0, sweet.temperature="
                          f"{sweet.temperature} > 0 and sweet.warmup_fraction={sweet.warmup_fraction} in [0, 1)")


def _validate_dpo(dpo: DpoSection) -> None:
    if dpo.epochs < 1 or dpo.batch_size < 1 or dpo.beta <= 0 or dpo.lr <= 0 or dpo.nll_coef < 0:
        raise ConfigError(f"dpo.epochs={dpo.epochs} and dpo.batch_size={dpo.batch_size} must be >= 1, dpo.beta="
                          f"{dpo.beta} and dpo.lr={dpo.lr} > 0, dpo.nll_coef={dpo.nll_coef} >= 0")
    if not 0.0 <= dpo.warmup_fraction < 1.0:
        raise ConfigError(f"dpo.warmup_fraction={dpo.warmup_fraction} must be in [0, 1)")
    check_choice(dpo.level, choices.DPO_LEVELS, "dpo.level", ConfigError)


def validate(config: TrainConfig) -> None:
    """Combinations that cannot run."""
    if not config.stages:
        raise ConfigError(f"stages is empty; list one or more of: {', '.join(STAGES)}")
    for stage in config.stages:
        if stage not in STAGES:
            raise ConfigError(f"stages: unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    if len(set(config.stages)) != len(config.stages):
        raise ConfigError(f"stages={list(config.stages)} names a stage twice; each stage appears once")
    loop = config.loop
    for key in ("iterations", "tasks_per_iteration", "rollouts_per_task", "epochs", "minibatch_size",
                "micro_batches"):
        if getattr(loop, key) < 1:
            raise ConfigError(f"loop.{key}={getattr(loop, key)} must be >= 1")
    rl = [s for s in config.stages if s in RL_STAGES]
    if any(s in ("loop", "rloo", "grpo", "ppo") for s in rl) and loop.rollouts_per_task < 2:
        raise ConfigError(f"loop.rollouts_per_task={loop.rollouts_per_task}: {rl[0]} compares rollouts of the same "
                          "task, so it needs at least 2")
    if loop.minibatch_size % loop.micro_batches:
        raise ConfigError(f"loop.minibatch_size={loop.minibatch_size} is not a multiple of "
                          f"loop.micro_batches={loop.micro_batches}")
    check_choice(loop.ratio_level, choices.RATIO_LEVELS, "loop.ratio_level", ConfigError)
    check_choice(loop.clip, choices.CLIP_MODES, "loop.clip", ConfigError)
    _validate_loop_coefficients(loop)
    _validate_advantage(loop.advantage, rl)
    check_choice(loop.ei_filter, choices.FINETUNE_FILTERS, "loop.ei_filter", ConfigError)
    check_choice(config.sft.per, choices.SFT_NORMALISATIONS, "sft.per", ConfigError)
    unknown_targets = [t for t in config.lora.targets if t not in choices.LORA_TARGETS]
    if unknown_targets or not config.lora.targets:
        raise ConfigError(f"lora.targets={list(config.lora.targets)!r}; valid: {', '.join(choices.LORA_TARGETS)}")
    for key in ("epochs", "batch_size", "demos", "log_every", "checkpoint_every"):
        if getattr(config.sft, key) < 1:
            raise ConfigError(f"sft.{key}={getattr(config.sft, key)} must be >= 1")
    if not 0.0 <= config.sft.mistake_rate <= 1.0:
        raise ConfigError(f"sft.mistake_rate={config.sft.mistake_rate} must be in [0, 1]")
    _validate_sft_stop(config.sft)
    _validate_eto(config.eto)
    _validate_collect(config.collect)
    _validate_critic(config.critic)
    _validate_sweet(config.sweet)
    _validate_dpo(config.dpo)
    if "sft" in config.stages and config.stages[0] != "sft":
        raise ConfigError(f"stages={list(config.stages)}: sft must come first (RL stages start from its policy)")
    if config.model.from_scratch and config.lora.enabled:
        raise ConfigError("lora.enabled=true with a model from scratch: adapters on random weights learn nothing; "
                          "set model.path (or model.path_env) or lora.enabled=false")
    if not config.lora.enabled and config.model.param_dtype not in ("float32", "f32", "fp32", "float64", "f64"):
        raise ConfigError(f"model.param_dtype={config.model.param_dtype} with lora.enabled=false trains every "
                          "parameter in that dtype, where most AdamW updates round away; set lora.enabled=true "
                          "(adapters train in float32 over the frozen base) or model.param_dtype=float32 (or float64)")
    if config.model.from_scratch and config.env.name == "appworld":
        raise ConfigError("env.name=appworld needs a pretrained model: set model.path or model.path_env")
    if config.eval.every < 1 or config.checkpoint.every < 1 or config.checkpoint.keep < 1:
        raise ConfigError("eval.every, checkpoint.every and checkpoint.keep must be >= 1")
    if config.eval.rollouts_per_task < 1 or config.eval.tasks < 0:
        raise ConfigError("eval.rollouts_per_task must be >= 1 and eval.tasks >= 0")
    check_sampling("eval", config.eval.temperature, config.eval.top_p, 0, ConfigError)
    if config.loop.kl_stop < 0:
        raise ConfigError(f"loop.kl_stop={config.loop.kl_stop} must be >= 0 (0 turns the guard off)")


def model_folder(section: ModelSection) -> Path | None:
    """The Hugging Face folder of a pretrained policy (None for a model from scratch), checked to exist."""
    if section.from_scratch:
        return None
    path = section.path or os.environ.get(section.path_env, "")
    if not path:
        raise ConfigError(f"no model folder: set model.path=/path/to/model or the environment variable "
                          f"{section.path_env} (a Hugging Face folder with config.json, *.safetensors and the "
                          "tokenizer; download one with `huggingface-cli download Qwen/Qwen2.5-32B-Instruct "
                          "--local-dir DIR` on a networked machine)")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        source = "model.path" if section.path else f"${section.path_env}"
        raise ConfigError(f"model folder {str(folder)!r} (from {source}) has no config.json; point it at a Hugging "
                          "Face model folder (download one with `huggingface-cli download Qwen/Qwen2.5-32B-Instruct "
                          "--local-dir DIR` on a networked machine)")
    return folder


def shared_fields(section: Any, target: type) -> dict:
    """The settings of `section` that the dataclass `target` (the runtime object it configures) has too, by name."""
    names = {field.name for field in dataclasses.fields(target)}
    return {field.name: getattr(section, field.name) for field in dataclasses.fields(section) if field.name in names}


def to_dict(config: TrainConfig) -> dict:
    """Plain data for the resolved-config file (tuples as lists)."""
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def save_resolved(config: TrainConfig, folder: Path) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
