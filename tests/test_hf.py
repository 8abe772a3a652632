"""Hugging Face import/export: sharded checkpoints, round trips through transformers, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxagent.export import export
from jaxagent.models import forward
from jaxagent.models.config import ModelConfigError, resolve_dtype
from jaxagent.models.hf import INDEX_FILE, CheckpointError, load_hf_params, save_hf_checkpoint

from conftest import VOCAB, hf_logits


def _shard(source: Path, dest: Path, files: int = 3) -> None:
    """Split a single-file checkpoint into several safetensors files with an index, as HF does for big models."""
    dest.mkdir()
    shutil.copy(source / "config.json", dest / "config.json")
    tensors = load_file(str(source / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for k in range(files):
        part = names[k::files]
        file = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(dest / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (dest / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture()
def sharded(hf_models, tmp_path) -> Path:
    _shard(hf_models["qwen2_untied"], tmp_path / "sharded")
    return tmp_path / "sharded"


def test_sharded_index_loads_identically_to_single_file(hf_models, sharded):
    assert len(list(sharded.glob("*.safetensors"))) == 3
    _, single = load_hf_params(hf_models["qwen2_untied"])
    _, multi = load_hf_params(sharded)
    chex.assert_trees_all_equal(single, multi)


def test_dtype_is_converted_while_loading(hf_models):
    config, params = load_hf_params(hf_models["llama2"], param_dtype="bf16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    assert config.param_dtype == jnp.bfloat16


@pytest.mark.parametrize("family", ["qwen2_tied", "llama3_gqa", "qwen3"])
def test_export_loads_in_transformers_with_equal_logits(hf_models, tmp_path, family):
    config, params = load_hf_params(hf_models[family])
    out = save_hf_checkpoint(tmp_path / "export", params, config)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
    ours = np.asarray(forward(params, config, jnp.asarray(ids)).logits_BxTxV)
    np.testing.assert_allclose(hf_logits(out, ids), ours, atol=1e-4, rtol=0)


def test_export_in_several_shards_round_trips(hf_models, tmp_path):
    config, params = load_hf_params(hf_models["qwen2_untied"])
    out = save_hf_checkpoint(tmp_path / "export", params, config, max_shard_bytes=100_000)
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    _, again = load_hf_params(out)
    chex.assert_trees_all_equal(params, again)


def test_export_cli_converts_dtype_and_copies_config(hf_models, tmp_path):
    out = export(hf_models["qwen3"], tmp_path / "bf16", dtype="bf16")
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16" and written["architectures"] == ["Qwen3ForCausalLM"]
    assert load_file(str(out / "model.safetensors"))["model.norm.weight"].dtype.name == "bfloat16"


def test_failed_export_leaves_no_folder(hf_models, tmp_path):
    config, params = load_hf_params(hf_models["llama2"])
    params = dict(params)
    del params["layers"]  # a broken tree fails half-way through writing
    with pytest.raises(KeyError):
        save_hf_checkpoint(tmp_path / "export", params, config)
    assert list(tmp_path.iterdir()) == []


# ---- bad input: one clear line, nothing half-loaded ---------------------------------------------------------------


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def test_unsupported_architecture_names_file_and_valid_values(hf_models, tmp_path):
    folder = _copy(hf_models["llama2"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match=r"config.json: unsupported architectures \['MistralForCausalLM'\]; "
                                               r"valid: Qwen2ForCausalLM"):
        load_hf_params(folder)


def test_missing_shard_is_named(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003.safetensors: missing shard"):
        load_hf_params(sharded)


def test_truncated_shard_is_named(sharded):
    shard = sharded / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003.safetensors: truncated; expected at least \d+"):
        load_hf_params(sharded)


def test_wrong_tensor_shape_names_tensor_and_expected_shape(hf_models, tmp_path):
    folder = _copy(hf_models["qwen2_untied"], tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:50]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \[50, 64\], "
                                              r"expected \[96, 64\]"):
        load_hf_params(folder)


def test_missing_tensor_is_named(hf_models, tmp_path):
    folder = _copy(hf_models["qwen3"], tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.self_attn.k_norm.weight' missing"):
        load_hf_params(folder)


def test_unknown_dtype_lists_valid_ones(hf_models):
    with pytest.raises(ModelConfigError, match=r"unknown dtype 'float8'; valid: .*bf16"):
        load_hf_params(hf_models["qwen2_tied"], param_dtype="float8")


def test_float64_without_jax_64_bit_mode_says_how_to_turn_it_on():
    """Without 64-bit mode JAX would quietly compute a "float64" model in float32."""
    with pytest.raises(ModelConfigError, match=r"dtype 'float64' needs JAX's 64-bit mode: set JAX_ENABLE_X64=1"):
        resolve_dtype("float64")


@pytest.mark.parametrize("args, expected", [
    (["--dtype", "int4"], "error: unknown dtype 'int4'; valid:"),
    (["--dtype", "f32", "--hf", "/nonexistent"], "error: /nonexistent/config.json: not found"),
])
def test_cli_bad_input_exits_with_one_line(hf_models, args, expected):
    argv = ["--hf", str(hf_models["qwen2_tied"])] + args
    proc = subprocess.run([sys.executable, "-m", "jaxagent.check_logits", *argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_cli_on_truncated_checkpoint_exits_with_one_line(sharded, tmp_path):
    shard = sharded / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    proc = subprocess.run([sys.executable, "-m", "jaxagent.export", "--checkpoint", str(sharded), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model-00001-of-00003.safetensors: truncated" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_stacked_leaves_are_filled_in_place():
    """Loading writes each layer into a donated buffer: the old buffer is gone, so no second copy is held."""
    from jaxagent.models.hf import _write_layer

    buffer = jnp.zeros((3, 4, 5))
    updated = _write_layer(buffer, np.ones((4, 5), np.float32), jnp.int32(1))
    assert buffer.is_deleted()
    np.testing.assert_array_equal(np.asarray(updated).sum(axis=(1, 2)), [0, 20, 0])


def test_flat_range_finds_exactly_the_blocks_that_are_one_range_of_the_file():
    """A block of jaxagent's layout is read alone from the file only when it is one contiguous range there."""
    import itertools

    from jaxagent.models.hf import _flat_range

    shape = (4, 3, 5)
    flat = np.arange(60).reshape(shape)
    choices = [[(0, 4), (1, 2), (1, 3)], [(0, 3), (1, 2), (0, 1)], [(0, 5), (2, 4)]]
    found = 0
    for bounds in itertools.product(*choices):
        block = flat[tuple(slice(a, b) for a, b in bounds)].ravel()
        contiguous = bool((np.diff(block) == 1).all())
        got = _flat_range(shape, bounds)
        assert (got is not None) == contiguous, bounds
        if got is not None:
            found += 1
            np.testing.assert_array_equal(flat.ravel()[got[0]:got[1]], block)
    assert found == 7
