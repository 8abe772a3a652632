"""Evaluate a saved run, or a model folder as it is.

    python -m jaxagent.evaluate --run DIR [--split test] [--stage NAME]
    python -m jaxagent.evaluate --model HF_DIR --config NAME [key=value ...] [--split test]

`--run` loads each finished stage's policy from the run folder and rolls it out on held-out tasks with the run's
evaluation settings and the seed its final evaluation used, then prints the same table `jaxagent.train` printed at
the end (identical numbers on the same split: rollouts of a run with `rollout.deterministic` repeat exactly).
Another `--split` evaluates on those tasks instead.

`--model` evaluates a Hugging Face folder zero-shot (no training) with a config's environment and evaluation
settings. With `eval.rollouts_per_task=N` (N > 1) the table adds best-of-N: the mean over tasks of the best of the
N rollouts' rewards (ETO's Best-of-N baseline), beside the mean over all rollouts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from jaxagent import compiling
from jaxagent.algorithms.common import PolicyParams, eval_seed, evaluate
from jaxagent.checkpoint import is_policy_folder
from jaxagent.config import ConfigError, load_config
from jaxagent.errors import run_main
from jaxagent.metrics import final_table


def evaluate_run(run_dir: Path, split: str | None = None, stages: Sequence[str] = ()) -> dict[str, dict]:
    """{stage: held-out statistics} for the run's finished stages (or the ones named)."""
    from jaxagent.train import build_setup

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run folder (no config.yaml); give the folder "
                          "`python -m jaxagent.train` wrote")
    config = load_config(str(config_file), [f"run_dir={run_dir}"])
    finished = [name for name in config.stages if is_policy_folder(run_dir / "stages" / name / "policy")]
    unknown = [name for name in stages if name not in finished]
    if unknown:
        raise ConfigError(f"--stage {unknown[0]!r} has no finished policy in {run_dir}; finished stages: "
                          f"{', '.join(finished) or 'none'}")
    if not finished:
        raise ConfigError(f"{run_dir}: no stage has finished yet; nothing to evaluate")
    setup, _ = build_setup(config, check_config=False)
    results = {}
    try:
        for name in stages or finished:
            stage_dir = run_dir / "stages" / name
            policy = PolicyParams(*setup.placement.load_policy(stage_dir / "policy"))
            seed = json.loads((stage_dir / "result.json").read_text())["eval_seed"]
            results[name], _ = evaluate(setup, policy, seed, split)
    finally:
        setup.close()
    return results


def evaluate_model(model_dir: Path, config_name: str, overrides: Sequence[str] = (), split: str | None = None
                   ) -> tuple[dict, object]:
    """(held-out statistics, config) of the Hugging Face model in `model_dir`, untrained, under `config_name`'s
    environment and evaluation settings (LoRA off: the folder's weights as they are)."""
    from jaxagent.train import build_setup

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {str(model_dir)!r} is not a Hugging Face model folder (no config.json)")
    with tempfile.TemporaryDirectory(prefix="jaxagent-evaluate-") as scratch:
        config = load_config(config_name, [*overrides, f"model.path={model_dir}", "lora.enabled=false",
                                           f"run_dir={scratch}"])
        setup, policy = build_setup(config, check_config=False)
        try:
            stats, _ = evaluate(setup, policy, eval_seed(config, 0, 0), split)
        finally:
            setup.close()
    return stats, config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxagent.evaluate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run folder written by jaxagent.train")
    source.add_argument("--model", help="a Hugging Face model folder, evaluated untrained (needs --config)")
    parser.add_argument("--config", help="with --model: the config whose environment and eval settings apply")
    parser.add_argument("overrides", nargs="*", help="with --model: key=value settings, as for jaxagent.train")
    parser.add_argument("--split", default=None, help="held-out split (default: the config's eval split)")
    parser.add_argument("--stage", action="append", default=[], help="with --run: only this stage (repeatable)")
    args = parser.parse_args(argv)
    compiling.prepare()  # before the first JAX computation
    if args.model:
        if not args.config:
            raise ConfigError("--model needs --config NAME (the environment and evaluation settings to use)")
        stats, config = evaluate_model(Path(args.model).absolute(), args.config, args.overrides, args.split)
        results = {"zero-shot": stats}
    else:
        if args.config or args.overrides:
            raise ConfigError("--config and key=value settings go with --model; a --run folder has its own config")
        run_dir = Path(args.run).absolute()
        results = evaluate_run(run_dir, args.split, args.stage)
        config = load_config(str(run_dir / "config.yaml"), [f"run_dir={run_dir}"])
    print(f"held-out evaluation ({config.env.name}, split {args.split or config.eval.split or config.env.eval_split}):")
    print(final_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
