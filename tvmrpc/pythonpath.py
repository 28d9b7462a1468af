"""PYTHONPATH for child processes: where this tvmrpc lives, put on the path once.

The demo's and tests' daemons, the bench's, and the server's workers all run
``python`` in a child process that must import *this* tvmrpc (a checkout, or
the installed package), whatever the parent's PYTHONPATH says.

Invariants:
- Pure: reads and returns mappings, never touches ``os.environ``.
- :data:`PACKAGE_ROOT` appears exactly once in the result's PYTHONPATH; every
  other entry keeps its order and empty entries are dropped.
- ``first=True`` puts it ahead of everything (a checkout wins over an installed
  copy); ``first=False`` keeps the caller's order and appends it only if absent
  (what a deployment's PYTHONPATH says comes first).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import tvmrpc

#: The directory that holds the ``tvmrpc`` package (a checkout or site-packages).
PACKAGE_ROOT = str(Path(tvmrpc.__file__).resolve().parent.parent)


def with_package_on_path(
    env: Mapping[str, str], first: bool = True, root: str = PACKAGE_ROOT
) -> dict[str, str]:
    """A copy of ``env`` whose PYTHONPATH holds ``root`` (first, or last if absent)."""
    result = dict(env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if first:
        paths = [root, *(p for p in paths if p != root)]
    elif root not in paths:
        paths.append(root)
    result["PYTHONPATH"] = os.pathsep.join(paths)
    return result
