"""Where jaxagent keeps what it can always rebuild, so the next run need not: XLA's compiled programs and
ScienceWorld's split table.

The folder is $JAXAGENT_CACHE_DIR, else $XDG_CACHE_HOME/jaxagent, else ~/.cache/jaxagent. Deleting it only makes
the next run slower.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """jaxagent's cache folder (see the module docstring)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxagent"
    return Path(os.environ.get("JAXAGENT_CACHE_DIR") or default)
