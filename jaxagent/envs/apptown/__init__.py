"""AppTown: the built-in environment — a small stateful world of apps (contacts, wallet, messages) driven by
model-written Python, in the spirit of AppWorld, small enough for a tiny model to learn on a CPU."""

from jaxagent.envs.apptown.env import AppTownEnv
from jaxagent.envs.apptown.tasks import split_tasks
from jaxagent.envs.base import EnvError, EnvSpec
from jaxagent.envs.sandbox import Sandbox, SandboxError


def check_sandbox(options: dict, concurrency: int) -> None:
    """Before a run collects anything: the sandbox can be walled in as `options` ask (else a one-line error)."""
    try:
        Sandbox(isolation=options.get("isolation", "namespaces")).close()
    except SandboxError as err:
        raise EnvError(f"apptown: {err}") from None


SPEC = EnvSpec(name="apptown", make=AppTownEnv, tasks=lambda split, options: split_tasks(split), start=check_sandbox)

__all__ = ["AppTownEnv", "SPEC"]
