"""The upstream test vectors live in the repository, each file traced to its upstream source,
and nothing in the project reads the folder they were first copied from."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from conftest import VECTORS

ROOT = VECTORS.parents[1]
ROW = re.compile(r"^\| `(?P<file>[^`]+)` \| `(?P<upstream>[^`]+)` \| `(?P<blob>[0-9a-f]{40})` \|$")
# How code reached the folder beside the repository (this file is the one exception).
NEEDLES = (str(Path("..", "shared")), '"shared" / "vectors"')


def _git_blob_id(data: bytes) -> str:
    """What ``git hash-object`` prints for a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _provenance() -> dict[str, str]:
    rows = {}
    for line in (VECTORS / "README.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match["file"]] = match["blob"]
    return rows


def test_every_vector_is_the_upstream_file_its_readme_row_names() -> None:
    rows = _provenance()
    files = {
        str(path.relative_to(VECTORS)): path
        for path in VECTORS.rglob("*")
        if path.is_file() and path.name != "README.md"
    }
    assert len(files) > 100
    assert set(files) == set(rows), "every vector file has exactly one provenance row"
    changed = [n for n, path in files.items() if _git_blob_id(path.read_bytes()) != rows[n]]
    assert changed == [], "vector files differ from the upstream blobs their rows name"


def _project_text_files() -> list[Path]:
    skip = {".git", ".venv", "vectors", "__pycache__", ".mypy_cache", ".ruff_cache", "results"}
    found = []
    for path in ROOT.rglob("*"):
        if skip.intersection(path.relative_to(ROOT).parts) or not path.is_file():
            continue
        if path == Path(__file__).resolve():
            continue
        if path.suffix in {".py", ".toml", ".md", ".sh", ".yaml", ".yml", ".cfg", ""} or (
            path.name in {"Makefile", "run", "system-deps"}
        ):
            found.append(path)
    return found


def test_nothing_reads_the_shared_folder_outside_the_repository() -> None:
    """A fresh clone has nothing beside it: tests, benchmarks, scripts and the Makefile read
    the repository's own copy of the vectors."""
    files = _project_text_files()
    assert any(p.name == "Makefile" for p in files) and any(p.suffix == ".py" for p in files)
    offenders = [
        str(path.relative_to(ROOT))
        for path in files
        if any(needle in path.read_text(errors="replace") for needle in NEEDLES)
    ]
    assert offenders == []
