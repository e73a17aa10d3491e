"""ruff sorts imports by what it takes for first-party code. A test helper module imported by
its bare name (``from databases import ...``) is first-party only if pyproject.toml says so:
otherwise ruff decides from what it finds on disk and in its cache, and a fresh clone can sort
differently from a working tree (CI failed that way once). Every helper must be listed."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HELPER_DIRS = ("tests", "tests/e2e", "tests/integration", "tests/unit")


def test_every_test_helper_module_is_first_party_for_isort() -> None:
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())
    known = set(settings["tool"]["ruff"]["lint"]["isort"]["known-first-party"])
    helpers = {
        path.stem
        for folder in HELPER_DIRS
        for path in (ROOT / folder).glob("*.py")
        if not path.stem.startswith("test_") and path.stem != "__init__"
    }
    assert helpers, "no helper modules found: the test looks in the wrong place"
    assert sorted(helpers - known) == []
