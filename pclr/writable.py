"""Is a path usable as an output directory? Asked before any work starts, so a command that cannot write its
results fails in its first second with one line, not after minutes of training or benchmarking.

    problem = unwritable_reason(Path("runs/x"))      # None, or "runs/x is a file, not a directory"
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union


def unwritable_reason(path: Union[str, os.PathLike], what: str = "directory") -> Optional[str]:
    """None when ``path`` is (or can be created as) a directory we can write files into; otherwise why not.

    The nearest existing ancestor is probed by creating (and removing) a temporary file in it: permission bits
    alone do not tell (root ignores them; a read-only filesystem keeps them)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"{p} is a file, not a {what}"
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{p} cannot be created: {probe} is a file"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        return f"{p} is not writable ({probe}: {reason})"
    return None
