"""Export a policy to a Hugging Face folder (LoRA merged) that transformers loads and vLLM serves.

    python -m jaxagent.export --checkpoint DIR --out HF_DIR [--dtype bf16] [--max-shard-gb 4]

DIR is a jaxagent policy checkpoint (see `jaxagent.checkpoint`) or a Hugging Face folder (e.g. to change dtype).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from jaxagent.checkpoint import is_policy_folder, load_policy
from jaxagent.errors import run_main
from jaxagent.models.config import resolve_dtype
from jaxagent.models.hf import CheckpointError, is_hf_folder, load_hf_params, save_hf_checkpoint


def export(checkpoint: str | Path, out: str | Path, dtype: str | None = None, max_shard_gb: float = 4.0) -> Path:
    """Write `checkpoint` as a HF folder at `out`; `dtype` (f32, bf16, ...) converts the weights."""
    checkpoint = Path(checkpoint)
    overrides = {"param_dtype": resolve_dtype(dtype)} if dtype else {}
    if is_policy_folder(checkpoint):
        policy = load_policy(checkpoint)
        config = policy.config.replace(**overrides) if overrides else policy.config
        params, lora, lora_params, tokenizer_dir = policy.params, policy.lora, policy.lora_params, policy.tokenizer_dir
    elif is_hf_folder(checkpoint):
        config, params = load_hf_params(checkpoint, **overrides)
        lora, lora_params, tokenizer_dir = None, None, checkpoint
    else:
        raise CheckpointError(f"{checkpoint}: neither a jaxagent policy checkpoint (jaxagent.json) nor a "
                              "Hugging Face folder (config.json + safetensors)")
    if overrides:
        import jax

        params = jax.tree.map(lambda x: x.astype(config.param_dtype), params)
    return save_hf_checkpoint(out, params, config, lora_params, lora, tokenizer_dir,
                              max_shard_bytes=int(max_shard_gb * (1 << 30)))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m jaxagent.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="jaxagent policy checkpoint or HF folder")
    parser.add_argument("--out", required=True, help="new folder for the Hugging Face model")
    parser.add_argument("--dtype", default=None, help="weight dtype of the export (default: as stored)")
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="largest safetensors file (GiB)")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out, args.dtype, args.max_shard_gb)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
