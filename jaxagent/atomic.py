"""Folders that are complete or absent: written under a temporary sibling name and renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class FolderExistsError(FileExistsError):
    """The destination folder already holds files; nothing is overwritten."""


@contextlib.contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder next to `folder`; on success it becomes `folder`, on any failure it is removed.

    `folder` must not exist or be empty, so finished work is never overwritten.
    """
    folder = Path(folder).absolute()
    if folder.exists() and any(folder.iterdir()):
        raise FolderExistsError(f"{folder}: exists and is not empty; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        yield staging
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)  # atomic on one filesystem: readers see all of it or nothing
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically, on failure it is removed."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
