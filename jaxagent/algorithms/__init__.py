"""Outer training loops, one per stage kind: `sft` (behaviour cloning), the policy-gradient family in `loop`,
`eto` (explore, pairs against the expert, trajectory DPO), and SWEET-RL's `collect` (offline trajectories),
`critic` (the Bradley-Terry critic), `sweet` (turn-level DPO ranked by the critic) and `dpo` (its multi-turn DPO
baseline on offline pairs).

Adding a stage kind: a module with `run(setup, stage_index, name, policy) -> (policy, eval_stats)`, one entry in
`STAGE_RUNNERS` and its name in `jaxagent.choices.STAGES`.
"""

from typing import Callable

from jaxagent.algorithms import collect, critic, dpo, eto, loop, sft, sweet
from jaxagent.errors import lookup

STAGE_RUNNERS: dict[str, Callable] = {"sft": sft.run, **{name: loop.run for name in loop.ALGORITHMS},
                                      "eto": eto.run, "collect": collect.run,
                                      "critic": critic.run, "sweet": sweet.run, "dpo": dpo.run}


def get_stage_runner(name: str) -> Callable:
    """The function that runs a stage called `name`."""
    return lookup(STAGE_RUNNERS, name, "stage")


__all__ = ["STAGE_RUNNERS", "get_stage_runner"]
