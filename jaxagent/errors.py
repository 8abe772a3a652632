"""User-facing errors, the one way to look a name up in a table, and the command-line wrapper that reports them.

Every error whose message already names the bad value and what would be valid derives from `UserError`; the
command-line entry points (`python -m jaxagent.train`, `.evaluate`, ...) run through `run_main`, which prints such an
error as one line and exits 2 instead of showing a trace. This module imports nothing from jaxagent, so every
part of the package (environments included) can use it.

Registries are module-level dicts from a name to an entry, read with `lookup`:

    ALGORITHMS = {"loop": Algorithm(...), ...}

    def get_algorithm(name: str) -> Algorithm:
        return lookup(ALGORITHMS, name, "algorithm")
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Mapping, Sequence, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Bad input from the user; the message names the bad value and what would be valid."""


def lookup(table: Mapping[str, T], name: str, what: str, error: type[UserError] = UserError) -> T:
    """`table[name]`, or an `error` that lists the valid names: "unknown {what} 'x'; valid: a, b"."""
    try:
        return table[name]
    except (KeyError, TypeError):
        raise error(f"unknown {what} {name!r}; valid: {', '.join(table)}") from None


def check_choice(value: str, choices: Sequence[str], key: str, error: type[UserError] = UserError) -> None:
    """Raise an `error` naming `key` when `value` is not one of `choices`: "{key}='x'; valid: a, b"."""
    if value not in choices:
        raise error(f"{key}={value!r}; valid: {', '.join(choices)}")


# Errors whose message names the bad value, raised by the standard library for bad paths.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, FileExistsError)


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command-line `main`, turning a user error into `error: <message>` on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except (UserError, *_PATH_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
