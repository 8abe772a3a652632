"""Shared fixtures: tiny random Hugging Face models of every supported family, built locally with transformers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Imports no JAX, so XLA's flags and the allocator can still be set.
from jaxagent.compiling import ACCELERATOR_PLUGINS, QUICK_CPU_FLAGS, collect_garbage_less_often, reuse_freed_memory

# XLA's compiled programs are kept on disk and shared by every test, worker and subprocess (end-to-end runs compile
# the same steps again and again): the first test to build a program pays for it. Set before JAX is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# jaxagent's own cache (ScienceWorld's split table) likewise, rather than the user's ~/.cache/jaxagent.
os.environ.setdefault("JAXAGENT_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jaxagent"))
# Most of the suite's time is XLA:CPU compiling tiny programs, not running them. Without LLVM's optimisation passes
# and with the classic fusion emitters a program compiles about five times faster (the same HLO program; only its
# machine code is less tuned), which more than pays for slower kernels on tiny shapes. Subprocesses inherit it; a
# test whose run is dominated by long sequences asks for `RUNTIME_FLAGS` instead: the flags users' commands compile
# with (`jaxagent.compiling`). `JAXAGENT_TEST_XLA_DEFAULTS=1` runs the suite, its commands included, with XLA's
# defaults.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
RUNTIME_FLAGS = " ".join(QUICK_CPU_FLAGS)
# Only for XLA:CPU: a GPU build of jaxlib dies on them. On a GPU, float32 matmuls default to TF32 (about 1e-3
# relative), so the suite's float32 comparisons ask for full precision.
ACCELERATOR = any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)
if os.environ.get("JAXAGENT_TEST_XLA_DEFAULTS"):
    os.environ["JAXAGENT_XLA_DEFAULTS"] = "1"
elif not ACCELERATOR:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
reuse_freed_memory()  # as the commands do: XLA's buffers are reused between calls, not mapped afresh for each


def pytest_collection_finish(session) -> None:
    """As the commands do, once every test module is imported: a worker that traces models for minutes spent ~10 %
    of its time in Python's garbage collector, most of it scanning the imported modules again and again."""
    collect_garbage_less_often()


def pytest_report_header(config) -> str:
    """The CPU the suite ran on and how fast it multiplies now, at the top of its log: the suite's durations differ
    2-3x between 2-core CI machines, also between two that report the same CPU model, so a log's timings mean
    something only beside these."""
    from benchmarks.machine import cpu_model, numpy_matmul_gflops

    return f"cpu: {cpu_model()}, {os.cpu_count()} cores, float32 matmul {numpy_matmul_gflops()} GFLOP/s (NumPy)"


VOCAB = 512

# name -> (transformers class name, config kwargs). Sizes are tiny but keep every structural feature.
FAMILIES = {
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2_untied": ("Qwen2", dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2)),
    "llama3_gqa": ("Llama", dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                 max_position_embeddings=1024,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama2": ("Llama", dict(num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5)),
    "qwen3": ("Qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
}


def build_hf_model(folder: Path, family: str, seed: int = 0, num_layers: int = 2):
    """Save a random tiny model of `family` to `folder` (weights perturbed so biases and norms are not trivial)."""
    import torch
    import transformers

    prefix, kwargs = FAMILIES[family]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                        **kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(folder))
    return model


def tiny_pretrained(folder: Path, texts: list[str], vocab_size: int = 1024, family: str = "Qwen2", **shape) -> Path:
    """A tiny random decoder of `family` with a tokenizer trained on `texts`, saved as a Hugging Face model folder
    (what a pretrained model's folder holds, at test size)."""
    import torch
    import transformers

    from jaxagent.local_tokenizer import save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=4096) | shape
    config = getattr(transformers, f"{family}Config")(vocab_size=len(tokenizer), **sizes)
    torch.manual_seed(0)
    getattr(transformers, f"{family}ForCausalLM")(config).save_pretrained(str(folder))
    save_tokenizer(tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Folder of a saved tiny random model for every family in FAMILIES."""
    root = tmp_path_factory.mktemp("hf_models")
    folders = {}
    for family in FAMILIES:
        folders[family] = root / family
        build_hf_model(folders[family], family)
    return folders


def hf_logits(folder: Path, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits of the transformers model in `folder` (float32) for a batch, positions skipping left padding."""
    import torch
    from transformers import AutoModelForCausalLM

    mask = np.ones_like(ids) if mask is None else mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(
            mask.astype(np.int64)), position_ids=torch.from_numpy(positions.astype(np.int64)))
    return out.logits.numpy()


# Minimal sizes: a one-layer decoder, a handful of demonstrations, two iterations of two tasks x two rollouts.
MICRO = [
    "progress=false", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
    "model.num_kv_heads=1", "model.head_dim=16", "model.vocab_size=512", "model.tokenizer_demos=10", "sft.demos=8",
    "sft.epochs=2", "sft.batch_size=4", "sft.log_every=1", "sft.checkpoint_every=1", "sft.optim.total_steps=4",
    "sft.optim.warmup_steps=0", "loop.iterations=2", "loop.tasks_per_iteration=2", "loop.rollouts_per_task=2",
    "loop.minibatch_size=4", "loop.critic_warmup_iterations=1", "eval.tasks=3", "eval.every=1",
    "rollout.max_turns=2", "rollout.max_tokens_per_turn=8", "rollout.max_context=768", "rollout.decode_chunk=8",
    "rollout.max_concurrent=8", "checkpoint.every=1",
]


@pytest.fixture(scope="session")
def rollouts(tmp_path_factory):
    """Real AppTown rollouts of a micro policy, with rewards set so every algorithm has something to learn:
    (setup, policy, config, trajectories), two tasks x three rollouts with rewards [1, 0, 0.5] and [0.25, 1, 0]."""
    import dataclasses

    import jax

    from jaxagent.config import load_config
    from jaxagent.envs.registry import list_tasks
    from jaxagent.rollout import collect
    from jaxagent.train import build_setup

    run_dir = tmp_path_factory.mktemp("learn")
    config = load_config("tiny", MICRO + [f"run_dir={run_dir}"])
    setup, policy = build_setup(config)
    tasks = list_tasks("apptown", "train")[:2]
    trajectories = collect(setup.sampler, policy.params, setup.renderer, setup.make_env, tasks, 3, config.rollout,
                           jax.random.key(0))
    rewards = [1.0, 0.0, 0.5, 0.25, 1.0, 0.0]
    by_slot = {(t.group_id, t.rollout_index): t for t in trajectories}
    trajectories = [dataclasses.replace(by_slot[g, k], reward=rewards[3 * g + k],
                                        info={**by_slot[g, k].info, "success": rewards[3 * g + k] == 1.0})
                    for g in range(2) for k in range(3)]
    return setup, policy, config, trajectories


def micro_train_command(run_dir: Path, *extra: str) -> list[str]:
    """`python -m jaxagent.train --config tiny` with the MICRO sizes, writing to `run_dir`."""
    return [sys.executable, "-m", "jaxagent.train", "--config", "tiny", *MICRO, f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> tuple[Path, str]:
    """(folder, stdout) of one uninterrupted `python -m jaxagent.train --config tiny` MICRO run, made once and shared
    by every test and pytest worker that compares against it (a file lock makes the others wait for the first)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's folder of all workers
    folder, stdout = shared / "micro_run", shared / "micro_run.out"
    with FileLock(str(shared / "micro_run.lock")):
        if not stdout.exists():
            proc = subprocess.run(micro_train_command(folder), capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-2000:]
            stdout.write_text(proc.stdout)
    return folder, stdout.read_text()
