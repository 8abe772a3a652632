"""Outer training loops, one per stage kind: `sft` (behaviour cloning) and the policy-gradient family in `loop`."""

from jaxagent.algorithms import loop, sft
from jaxagent.config import RL_STAGES

STAGE_RUNNERS = {"sft": sft.run, **{name: loop.run for name in RL_STAGES}}

__all__ = ["STAGE_RUNNERS"]
