"""The system tools that tests run, each named with the Debian package that provides it.

``scripts/system-deps`` installs those packages (``make test`` calls it). A test that still
finds one missing fails with the package's name, rather than a ``FileNotFoundError``.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def require(tool: str, package: str, *, default: str | None = None) -> Path:
    """The path of ``tool`` (a command on PATH, or an absolute file path), or a clear error."""
    found = shutil.which(tool) if "/" not in tool else (tool if Path(tool).exists() else None)
    if found is None and default is not None and Path(default).exists():
        found = default
    if found is None:
        raise RuntimeError(
            f"{tool} is not installed: it comes with the Debian package {package} "
            "(run scripts/system-deps as root, or `make test`, to install it)"
        )
    return Path(found)
