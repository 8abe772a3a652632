"""Evaluate a saved run: `python -m jaxagent.evaluate --run DIR [--split test] [--stage NAME]`.

Loads each finished stage's policy from the run folder and rolls it out on held-out tasks with the run's
evaluation settings and the seed its final evaluation used, then prints the same table `jaxagent.train` printed at
the end (identical numbers on the same split: rollouts of a run with `rollout.deterministic` repeat exactly).
Another `--split` evaluates on those tasks instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from jaxagent.algorithms.common import PolicyParams, evaluate
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxagent.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run folder written by jaxagent.train")
    parser.add_argument("--split", default=None, help="held-out split (default: the run's eval split)")
    parser.add_argument("--stage", action="append", default=[], help="only this stage (repeatable)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run).absolute()
    results = evaluate_run(run_dir, args.split, args.stage)
    config = load_config(str(run_dir / "config.yaml"), [f"run_dir={run_dir}"])
    print(f"held-out evaluation ({config.env.name}, split {args.split or config.eval.split or config.env.eval_split}):")
    print(final_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
