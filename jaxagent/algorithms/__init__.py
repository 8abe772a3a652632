"""Outer training loops, one per stage kind: `sft` (behaviour cloning), the policy-gradient family in `loop`, and
`eto` (explore, pairs against the expert, trajectory DPO) `collect` (offline trajectories for SWEET-RL) and
`critic` (SWEET-RL's Bradley-Terry critic) and `dpo`
(multi-turn DPO on offline pairs).

Adding a stage kind: a module with `run(setup, stage_index, name, policy) -> (policy, eval_stats)`, one entry in
`STAGE_RUNNERS` and its name in `jaxagent.choices.STAGES`.
"""

from typing import Callable

from jaxagent.algorithms import collect, critic, dpo, eto, loop, sft
from jaxagent.errors import lookup

STAGE_RUNNERS: dict[str, Callable] = {"sft": sft.run, **{name: loop.run for name in loop.ALGORITHMS},
                                      "eto": eto.run, "collect": collect.run,
                                      "critic": critic.run, "dpo": dpo.run}


def get_stage_runner(name: str) -> Callable:
    """The function that runs a stage called `name`."""
    return lookup(STAGE_RUNNERS, name, "stage")


__all__ = ["STAGE_RUNNERS", "get_stage_runner"]
