"""The Secret Manager STAND-IN on loopback HTTP, credentials for it, and the production backend
pointed at it (tests/standins/gcp_secrets.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keybroker.storage.gcp_secrets import GcpSecretsConfig, GcpSecretsSecretBackend
from standins.gcp_secrets import SecretManagerStandIn, ServiceAccount
from standins.server import ServedApp

PROJECT = "stand-in-project"


@dataclass
class GcpStandIn:
    server: ServedApp
    state: SecretManagerStandIn
    account: ServiceAccount

    @property
    def token_uri(self) -> str:
        return f"{self.server.url}/token"


def adc_env(credentials_file: Path, tmp_path: Path) -> dict[str, str]:
    """The Application Default Credentials chain's first link, and no other: no gcloud
    configuration of the host, no metadata server probe."""
    return {
        "GOOGLE_APPLICATION_CREDENTIALS": str(credentials_file),
        "CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud-config"),
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9",  # never reached: NO_GCE_CHECK; a closed port anyway
    }


@contextmanager
def gcp_stand_in() -> Iterator[GcpStandIn]:
    state = SecretManagerStandIn(PROJECT)
    account = ServiceAccount(f"kbs-reader@{PROJECT}.iam.gserviceaccount.com")
    state.trust(account)
    server = ServedApp(state.app())
    server.start()
    try:
        yield GcpStandIn(server, state, account)
    finally:
        server.stop()


def use_service_account(
    stand_in: GcpStandIn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    account: ServiceAccount | None = None,
) -> None:
    key_file = (account or stand_in.account).key_file(tmp_path / "sa.json", stand_in.token_uri)
    for name, value in adc_env(key_file, tmp_path).items():
        monkeypatch.setenv(name, value)


def gcp_backend(stand_in: GcpStandIn, **changes: Any) -> GcpSecretsSecretBackend:
    settings: dict[str, Any] = {
        "project_id": PROJECT,
        "endpoint_url": stand_in.server.url,
        "timeout": 2,
        "max_attempts": 2,
        **changes,
    }
    return GcpSecretsSecretBackend(GcpSecretsConfig.model_validate(settings))
