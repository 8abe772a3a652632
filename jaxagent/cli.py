"""Shared command-line plumbing: expected errors become one line on stderr and a non-zero exit, never a trace."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

from jaxagent.config import ConfigError
from jaxagent.data import DataError
from jaxagent.envs.base import EnvError
from jaxagent.models.config import ModelConfigError
from jaxagent.models.hf import CheckpointError
from jaxagent.models.lora import LoraConfigError
from jaxagent.tokens import ChatTemplateError, TemplateNotAppendOnly
from jaxagent.update import UpdateConfigError

# Errors whose message already names the bad value and what would be valid.
USER_ERRORS = (ConfigError, DataError, EnvError, UpdateConfigError, ModelConfigError, CheckpointError,
               LoraConfigError, ChatTemplateError, TemplateNotAppendOnly,
               FileNotFoundError, NotADirectoryError, FileExistsError)  # includes atomic.FolderExistsError

EXIT_USER_ERROR = 2


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI `main`, turning a user error into `error: <message>` and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
