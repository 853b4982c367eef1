"""Checks a command runs on its arguments before any work, so that a run of minutes never fails
at its end on something that was wrong from the start."""

from __future__ import annotations

import os
from pathlib import Path


def output_paths(paths: dict[str, str | None]) -> None:
    """Every output (flag -> path, ``None`` where not asked for) can be written; else
    ``ValueError`` naming the flag, the path and the fix, in one line."""
    for flag, given in paths.items():
        if not given:
            continue
        path = Path(given)
        folder = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise ValueError(f"{flag} {given}: is a folder; name a file in it")
        if not folder.is_dir():
            raise ValueError(f"{flag} {given}: the folder {folder} does not exist; create it "
                             f"(mkdir -p {folder}) or write elsewhere")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"{flag} {given}: not writable here; write elsewhere")
