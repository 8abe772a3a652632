"""AppTown: the built-in environment — a small stateful world of apps (contacts, wallet, messages) driven by
model-written Python, in the spirit of AppWorld, small enough for a tiny model to learn on a CPU."""

from jaxagent.envs.apptown.env import AppTownEnv
from jaxagent.envs.apptown.tasks import split_tasks
from jaxagent.envs.base import EnvSpec

SPEC = EnvSpec(name="apptown", make=AppTownEnv, tasks=lambda split, options: split_tasks(split))

__all__ = ["AppTownEnv", "SPEC"]
