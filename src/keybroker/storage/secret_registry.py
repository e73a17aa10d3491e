"""The secret backends a ``resource`` (or ``pkcs11``) plugin can use: an explicit, typed table.

Configuration names a backend by kind (``storage_backend_type = "vault"``); :data:`SECRET_BACKENDS`
maps the kind to its settings model and its constructor, both imported here by name, so mypy
checks every entry and the import graph shows every backend. Configuration never names code to
import.

Every module imported here imports only Keybroker's core dependencies at its top: the backend's
driver (python-pkcs11, hvac, boto3, google-cloud-secret-manager) is an optional extra that the
backend imports when it is built, and a missing one stops start-up with the ``pip install`` line
that adds it. So settings parse, and a config file is checked, without any extra installed.

This module does not parse the plugin table (``keybroker.config``) nor build the plugin
(``keybroker.kbs.services``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from keybroker.storage.aliyun_kms import AliyunKmsConfig, AliyunKmsSecretBackend
from keybroker.storage.aws_secrets import AwsSecretsConfig, AwsSecretsSecretBackend
from keybroker.storage.base import KeyValueStorage
from keybroker.storage.gcp_secrets import GcpSecretsConfig, GcpSecretsSecretBackend
from keybroker.storage.pkcs11 import Pkcs11Config, Pkcs11SecretBackend
from keybroker.storage.secrets import SecretBackend
from keybroker.storage.vault import VaultSecretBackend
from keybroker.storage.vault_settings import VaultConfig
from keybroker.storage.versions import DEFAULT_MAX_VERSIONS

SettingsT = TypeVar("SettingsT", bound=BaseModel)


@dataclass(frozen=True)
class BuildContext:
    """What a backend may take from the KBS besides its settings: the KBS's own key-value
    store by namespace (PKCS#11 keeps its version records there) and the plugin's
    ``max_versions``."""

    namespace: Callable[[str], KeyValueStorage]
    max_versions: int | None = None


@dataclass(frozen=True)
class SecretBackendKind(Generic[SettingsT]):
    """One kind of secret backend: the model of its settings and the function that builds it
    from them (the backend imports its optional driver there)."""

    settings: type[SettingsT]
    factory: Callable[[SettingsT, BuildContext], SecretBackend]

    def parse(self, values: Mapping[str, Any]) -> SettingsT:
        """``values`` checked by this kind's model (pydantic's ``ValidationError`` otherwise)."""
        return self.settings.model_validate(dict(values))

    def build(self, settings: BaseModel, context: BuildContext) -> SecretBackend:
        """The backend, from settings :meth:`parse` returned."""
        if not isinstance(settings, self.settings):
            raise TypeError(f"expected {self.settings.__name__}, got {type(settings).__name__}")
        return self.factory(settings, context)


def _pkcs11(settings: Pkcs11Config, context: BuildContext) -> SecretBackend:
    """Bytes on the token, version records in the KBS's own store (storage/pkcs11.py)."""
    return Pkcs11SecretBackend.from_config(
        settings,
        namespace=context.namespace,
        max_versions=context.max_versions or DEFAULT_MAX_VERSIONS,
    )


def _settings_only(
    from_config: Callable[[SettingsT], SecretBackend],
) -> Callable[[SettingsT, BuildContext], SecretBackend]:
    """A backend that needs nothing but its settings."""
    return lambda settings, _context: from_config(settings)


# kind (as :func:`keybroker.config.resource_backend_kind` spells it) -> backend
SECRET_BACKENDS: Mapping[str, SecretBackendKind[Any]] = {
    "pkcs11": SecretBackendKind(Pkcs11Config, _pkcs11),
    "vault": SecretBackendKind(VaultConfig, _settings_only(VaultSecretBackend.from_config)),
    "aliyun": SecretBackendKind(
        AliyunKmsConfig, _settings_only(AliyunKmsSecretBackend.from_config)
    ),
    "aws": SecretBackendKind(AwsSecretsConfig, _settings_only(AwsSecretsSecretBackend.from_config)),
    "gcp": SecretBackendKind(GcpSecretsConfig, _settings_only(GcpSecretsSecretBackend.from_config)),
}
