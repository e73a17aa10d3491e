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

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"


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


def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.skip(f"upstream test vectors not found at {VECTORS} (../shared/vectors)")
    return VECTORS


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    """One SoftHSM2 token for the session (SoftHSM reads its configuration once per process)."""
    return init_token(tmp_path_factory.mktemp("softhsm"))
