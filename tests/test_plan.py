"""`python -m jaxagent.plan`: compiled memory per device on simulated devices, the fit verdict and exit code, and
the built-in shapes of the paper models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from jaxagent.config import load_config
from jaxagent.plan import KNOWN_SHAPES, PlanError, model_shapes


def _config(tmp_path, model_dir) -> str:
    """A LoRA LOOP run of the tiny Hugging Face model on a data=2, fsdp=2, tensor=2 mesh."""
    path = tmp_path / "tiny_plan.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny_plan", "stages": ["loop"], "model": {"path": str(model_dir)},
        "lora": {"enabled": True, "rank": 4, "alpha": 8.0},
        "rollout": {"max_context": 256, "max_concurrent": 8, "decode_chunk": 16},
        "loop": {"minibatch_size": 8, "micro_batches": 2}, "mesh": {"data": 2, "fsdp": 2, "tensor": 2}}))
    return str(path)


def _plan(*args: str) -> tuple[int, str, dict | None]:
    proc = subprocess.run([sys.executable, "-m", "jaxagent.plan", *args, "--json"], capture_output=True, text=True,
                          timeout=300)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return proc.returncode, proc.stdout + proc.stderr, report


@pytest.mark.slow
def test_plan_of_a_sharded_lora_run_counts_each_part_per_device_and_exits_by_the_verdict(tmp_path, hf_models):
    config = _config(tmp_path, hf_models["qwen2_untied"])
    code, out, report = _plan("--config", config, "--devices", "8", "--device-memory", "1", "--devices-per-host", "4")
    assert code == 0 and report["fits"] and "fits" in out, out[-2000:]
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    update, decode = report["phase_bytes"]["update step"], report["phase_bytes"]["decoding"]
    # The KV cache on one host's 4 devices (data 2, tensor 2): 8 episodes over 2 data shards, 2 kv heads over 2.
    layers, kv_heads, head_dim, context, rows = 2, 2, 16, 256, 8
    kv = 2 * layers * (rows // 2) * (kv_heads // 2) * context * head_dim * 4 + (rows // 2) * (context + 1) * 4
    assert decode["KV cache"] == kv
    assert update["activations (update)"] > 0 and decode["activations (decode)"] > 0
    assert report["largest_concurrent_episodes"] > rows and report["largest_micro_batch_rows"] >= 4

    # The same run on one device holds the whole model: more parameter bytes than a quarter-split device.
    code, out, single = _plan("--config", config, "--devices", "1", "--device-memory", "1")
    assert code == 0 and single["mesh"] is None, out[-2000:]
    assert single["phase_bytes"]["update step"]["parameters"] > 2 * update["parameters"]

    # A device too small for it: the verdict says so and the exit code is 1.
    code, out, small = _plan("--config", config, "--devices", "8", "--device-memory", "0.0001")
    assert code == 1 and not small["fits"] and "does NOT fit" in out


@pytest.mark.slow
def test_plan_under_a_kv_budget_compiles_its_extreme_caches_and_refuses_one_below_an_episode(tmp_path, hf_models):
    config = _config(tmp_path, hf_models["qwen2_untied"])
    budget = 1e-4  # GiB per device: 2 whole-context rows of 256 slots, or all 8 rows at 64 slots
    code, out, report = _plan("--config", config, f"rollout.kv_cache_gb={budget}", "--devices", "8",
                              "--device-memory", "1", "--devices-per-host", "4")
    assert code == 0 and report["kv_budget_gib"] == pytest.approx(budget, rel=1e-4), out[-2000:]
    assert report["decode_shapes"] == [[2, 256], [8, 64]]
    assert 0 < report["phase_bytes"]["decoding"]["KV cache"] <= budget * 2**30
    assert report["largest_concurrent_episodes"] == 8 and "2 at 256 tokens each; all 8 while each holds up to 64" in out
    code, out, _ = _plan("--config", config, "rollout.kv_cache_gb=1e-6", "--devices", "8", "--device-memory", "1",
                         "--devices-per-host", "4")
    assert code != 0 and "cannot hold one episode of 256 tokens" in out


def test_built_in_shapes_stand_in_for_absent_weights(monkeypatch):
    monkeypatch.delenv("JAXAGENT_MODEL_DIR", raising=False)
    model = model_shapes(load_config("loop_qwen32b"))
    assert (model.num_layers, model.hidden_size, model.num_kv_heads) == (64, 5120, 8)
    assert 32.5e9 < model.num_params < 33.0e9  # Qwen2.5-32B
    assert 7.5e9 < model_shapes(load_config("loop_qwen7b")).num_params < 7.7e9  # Qwen2.5-7B
    with pytest.raises(PlanError, match="model.shapes='gpt5'; built-in shapes: " + ", ".join(KNOWN_SHAPES)):
        model_shapes(load_config("loop_qwen32b", ["model.shapes=gpt5"]))


def test_local_backend_refuses_another_device_count():
    code, out, _ = _plan("--config", "loop_qwen7b", "--devices", "4", "--device-memory", "80", "--backend", "local")
    assert code != 0 and "--backend local compiles for this machine's 1 device(s); --devices=4 differs" in out


# Compiles a LoRA LOOP step of a small model (8 layers, full recomputation) at 8K tokens on a tensor=4 mesh and
# prints XLA's temporary bytes per device; with an argument, under training rules that leave the layer inputs whole
# (a fresh process each: traced programs are cached by their shapes, not by the rules).
_SEQUENCE_PARALLEL_PROBE = """
import sys
from jaxagent.plan import _simulate_devices, _compiled_update
_simulate_devices(4)
import jax
from jaxagent import sharding
from jaxagent.config import load_config
from jaxagent.models.config import ModelConfig
from jaxagent.models.lora import LoraConfig
shapes = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512}
model = ModelConfig.from_hf_dict(shapes, remat="full", attention_block=1024)
config = load_config("tiny", ["stages=[loop]", "rollout.max_context=8192", "loop.minibatch_size=1",
                              "loop.micro_batches=1"])
if len(sys.argv) > 1:
    sharding.TRAIN_RULES = {**sharding.TRAIN_RULES, "activation_length": None}
mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 4})
compiled, _ = _compiled_update(config, model, LoraConfig(rank=4, alpha=8.0), mesh, 1, 1)
print(compiled.memory_analysis().temp_size_in_bytes)
"""


def _update_peak(*args: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _SEQUENCE_PARALLEL_PROBE, *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def test_training_splits_the_recomputed_layer_inputs_over_tensor():
    """Sequence parallelism: with full recomputation the backward pass keeps each layer's input, [T, D] per layer;
    split over `tensor` each device keeps a quarter of it, so the step needs much less than with inputs whole."""
    split, whole = _update_peak(), _update_peak("whole")
    # The 8 kept inputs alone are 8 x 8192 x 256 x 4 bytes = 64 MiB whole, 16 MiB split.
    assert whole - split > 32 * 2**20, (split / 2**20, whole / 2**20)
