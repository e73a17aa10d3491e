"""The production GCP backend pointed at the Secret Manager STAND-IN
(tests/standins/gcp_secrets.py)."""

from __future__ import annotations

from typing import Any

from keybroker.storage.gcp_secrets import GcpSecretsConfig, GcpSecretsSecretBackend
from standins.gcp_secrets import PROJECT, GcpStandIn


def gcp_backend(stand_in: GcpStandIn, **changes: Any) -> GcpSecretsSecretBackend:
    settings: dict[str, Any] = {
        "project_id": PROJECT,
        "endpoint_url": stand_in.server.url,
        "timeout": 2,
        "max_attempts": 2,
        **changes,
    }
    return GcpSecretsSecretBackend(GcpSecretsConfig.model_validate(settings))
