"""Shared test fixtures: an injected clock and a KBS app driven in-process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from keybroker.config import KbsConfig, parse_config
from keybroker.kbs.app import create_app
from softhsm import SoftHsm, init_token

# Upstream's recorded test data, copied into the repository with its provenance (README there).
VECTORS = Path(__file__).resolve().parent / "vectors"


@dataclass
class FakeClock:
    """Time is injected, never slept on."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Kbs:
    client: TestClient
    clock: FakeClock
    config: KbsConfig = field(repr=False)


def kbs_config(**sections: object) -> KbsConfig:
    document: dict[str, object] = {
        "http_server": {"insecure_http": True},
        "admin": {"authorization_mode": "InsecureAllowAll"},
        "audit": {"sink": "stdout"},  # tests of the file sink give their own path
    }
    document.update(sections)
    return parse_config(document, source="test")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def kbs(clock: FakeClock) -> Iterator[Kbs]:
    config = kbs_config()
    with TestClient(create_app(config, clock=clock)) as client:
        yield Kbs(client, clock, config)


def vector(*parts: str) -> Path:
    """The path of one file or folder under ``tests/vectors``.

    If it is absent the calling test (or, at import time, its module) is skipped with a message
    naming the missing file, never a collection error. ``make test`` fails on any skip, so a
    fresh clone must carry every vector."""
    path = VECTORS.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"test vector missing: {path.relative_to(VECTORS.parent.parent)}",
            allow_module_level=True,
        )
    return path


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    """One SoftHSM2 token for the session (SoftHSM reads its configuration once per process)."""
    return init_token(tmp_path_factory.mktemp("softhsm"))


# --- make test fails on any skip -------------------------------------------------------------
# A skip on a fresh clone means missing data or a missing tool, which the project's own files
# must provide: `make test` (and so CI) runs with --no-skips and fails on the first such sign.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-skips",
        action="store_true",
        help="fail the run if any test is skipped (make test and CI run this way)",
    )


def _skipped(config: pytest.Config) -> list[pytest.TestReport]:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return list(reporter.stats.get("skipped", [])) if reporter is not None else []


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    skipped = _skipped(config)
    if config.getoption("--no-skips") and skipped:
        terminalreporter.write_line(
            f"--no-skips: {len(skipped)} skipped test(s) fail this run (reasons in the summary)",
            red=True,
        )


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--no-skips") and _skipped(session.config) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
