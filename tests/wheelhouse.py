"""An offline wheelhouse for tests that run ``pip install``: this environment's installed
distributions packed back into wheels.

``make background-check-kbs`` installs ``keybroker[extras]`` with pip into a fresh virtual
environment. With ``pip_env(wheelhouse)`` pip sees no index and no user configuration, only
these wheels, so a test build needs no network and installs exactly what the dependency
metadata asks for: an extra the target left out cannot arrive by accident.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import zipfile
from importlib.metadata import Distribution, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

# What installing keybroker with any extra can need, and its build backend.
ROOTS = ("keybroker[aliyun,grpc,pkcs11,postgres,pqc,redis,vault]", "setuptools>=77")
_SKIPPED = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def closure(roots: tuple[str, ...] = ROOTS) -> list[Distribution]:
    """The installed distributions ``roots`` need (markers evaluated here, extras followed);
    keybroker itself is built from source and left out."""
    found: dict[str, Distribution] = {}
    pending = [Requirement(root) for root in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    here = {name: str(value) for name, value in default_environment().items()}
    while pending:
        requirement = pending.pop()
        key = (_normalized(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = distribution(requirement.name)
        if key[0] != "keybroker":
            found[key[0]] = dist
        for text in dist.requires or []:
            needed = Requirement(text)
            wanted = [{**here, "extra": extra} for extra in {"", *key[1]}]
            if needed.marker is None or any(needed.marker.evaluate(env) for env in wanted):
                pending.append(needed)
    return sorted(found.values(), key=lambda d: _normalized(d.metadata["Name"]))


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _compressed(tags: list[str]) -> str:
    """A wheel file name's tag part: ``py2-none-any`` + ``py3-none-any`` is ``py2.py3-none-any``."""
    parts = [tag.split("-") for tag in tags]
    return "-".join(".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))


def repack(dist: Distribution, out: Path) -> Path:
    """``dist``'s installed files as a wheel in ``out`` (scripts outside site-packages are
    left out: pip makes console scripts again from ``entry_points.txt``)."""
    name, version = _normalized(dist.metadata["Name"]), dist.version
    tags = [
        line.split(":", 1)[1].strip()
        for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    ]
    wheel = out / f"{name}-{version}-{_compressed(tags or ['py3-none-any'])}.whl"
    records: list[str] = []
    record_name = ""
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for file in dist.files or []:
            arcname = file.as_posix()
            parts = file.parts
            own = len(parts) == 2 and parts[0].endswith(".dist-info")  # not a vendored one
            if own and file.name == "RECORD":
                record_name = arcname
            if parts[0] == ".." or "__pycache__" in parts or (own and file.name in _SKIPPED):
                continue
            data = Path(str(dist.locate_file(file))).read_bytes()
            archive.writestr(arcname, data)
            records.append(_record_line(arcname, data))
        archive.writestr(record_name, "\n".join([*records, f"{record_name},,", ""]))
    return wheel


def build_wheelhouse(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for dist in closure():
        repack(dist, out)
    return out


def pip_env(wheelhouse: Path) -> dict[str, str]:
    """The environment for a pip that installs from ``wheelhouse`` only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {
        **env,
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheelhouse),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
    }
