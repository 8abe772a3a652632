"""Check a conversion: the same token batch through transformers (PyTorch, CPU) and jaxagent, logits compared.

    python -m jaxagent.check_logits --hf HF_DIR [--dtype f32|bf16] [--tol X]

Prints the max |Δlogit| over real tokens (the batch has a left-padded row, so masking and positions are checked
too) and exits 1 above the tolerance. The default tolerance is 1e-4 (f32) or 5e-2 (bf16) times max(1, max |logit|)
of the reference, since rounding error grows with the logits' magnitude.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxagent.errors import run_main
from jaxagent.models.config import ModelConfigError, dtype_name, resolve_dtype

RELATIVE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
EXIT_MISMATCH = 1


def token_batch(vocab_size: int, batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ids, a 0/1 attention mask with every other row left-padded, and positions that skip the padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, length), dtype=np.int64)
    mask = np.ones((batch, length), np.int64)
    for row in range(1, batch, 2):
        mask[row, : length // 3 + row % 3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def reference_logits(hf_dir: Path, dtype: str, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Logits of the transformers model (PyTorch on CPU) in `dtype`, as float32."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ModelConfigError("check_logits needs PyTorch: pip install torch==2.13.0 (or pip install -e '.[test]')"
                               ) from None
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch_dtype).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions))
    return out.logits.float().numpy()


def jaxagent_logits(hf_dir: Path, dtype: str, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Logits of the jaxagent decoder loaded from the same folder, parameters and compute in `dtype`."""
    import jax.numpy as jnp

    from jaxagent.models import forward
    from jaxagent.models.hf import load_hf_params

    config, params = load_hf_params(hf_dir, param_dtype=dtype, dtype=dtype)
    out = forward(params, config, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
                  jnp.asarray(mask, jnp.int32))
    return np.asarray(out.logits_BxTxV, np.float32)


def compare(hf_dir: str | Path, dtype: str = "f32", tol: float | None = None, batch: int = 2, length: int = 24,
            seed: int = 0) -> dict:
    """Run both models on one batch; returns max_abs_diff, tolerance, argmax agreement and `ok`."""
    hf_dir = Path(hf_dir)
    dtype = dtype_name(resolve_dtype(dtype))
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ModelConfigError(f"{config_file}: not found; --hf must be a Hugging Face model folder")
    vocab_size = int(json.loads(config_file.read_text()).get("vocab_size", 0))
    ids, mask, positions = token_batch(vocab_size, batch, length, seed)
    ours = jaxagent_logits(hf_dir, dtype, ids, mask, positions)
    ref = reference_logits(hf_dir, dtype, ids, mask, positions)
    real = mask.astype(bool)
    diff = float(np.abs(ours - ref)[real].max())
    scale = max(1.0, float(np.abs(ref[real]).max()))
    tolerance = tol if tol is not None else RELATIVE_TOLERANCE[dtype] * scale
    agree = float((ours.argmax(-1) == ref.argmax(-1))[real].mean())
    return {"max_abs_diff": diff, "tolerance": tolerance, "max_abs_logit": scale, "argmax_agreement": agree,
            "dtype": dtype, "ok": diff <= tolerance}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: prints the comparison; exit 0 when within tolerance, 1 when not."""
    parser = argparse.ArgumentParser(prog="python -m jaxagent.check_logits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model folder")
    parser.add_argument("--dtype", default="f32", help="f32 or bf16 (parameters and compute on both sides)")
    parser.add_argument("--tol", type=float, default=None, help="max |Δlogit| allowed (default: see module doc)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if dtype_name(resolve_dtype(args.dtype)) not in RELATIVE_TOLERANCE:
        raise ModelConfigError(f"--dtype {args.dtype!r} not supported; valid: f32, bf16, f16")
    result = compare(args.hf, args.dtype, args.tol, args.batch, args.length, args.seed)
    verdict = "OK" if result["ok"] else "MISMATCH"
    print(f"{verdict}: max |Δlogit| = {result['max_abs_diff']:.3g} (tolerance {result['tolerance']:.3g}, "
          f"{result['dtype']}, argmax agreement {100 * result['argmax_agreement']:.1f}%)")
    return 0 if result["ok"] else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(run_main(main))
