"""``make test`` runs pytest with --no-skips: one skipped test fails the whole run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _pytest(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n"
        "def test_runs() -> None:\n    assert True\n\n"
        "def test_skips() -> None:\n    pytest.skip('test vector missing: x')\n"
    )
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider"),
            *flags,
            *("-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )


def test_a_skip_fails_the_run_under_no_skips(tmp_path: Path) -> None:
    strict = _pytest(tmp_path, "--no-skips")
    assert strict.returncode == 1, strict.stdout
    assert "--no-skips: 1 skipped test(s) fail this run" in strict.stdout
    assert "1 passed, 1 skipped" in strict.stdout


def test_a_skip_is_only_reported_without_it(tmp_path: Path) -> None:
    relaxed = _pytest(tmp_path)
    assert relaxed.returncode == 0, relaxed.stdout
    assert "fail this run" not in relaxed.stdout
