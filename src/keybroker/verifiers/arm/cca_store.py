"""The CCA verifier's local endorsements and its configuration.

Upstream's local mode reads two JSON files in Veraison ``ccatoken``'s store format:

- the **trust-anchor store** (``ta-store``): ``[{"pkey": <EC JWK>, "implementation-id": <hex
  32 bytes>, "instance-id": <hex 33 bytes>}]``, the CPAK of each known platform instance;
- the **reference-value store** (``rv-store``): ``{"platform": [{"implementation-id": <hex>,
  "platform-configuration": <hex>, "sw-components": [{"measurement-value", "signer-id",
  "component-type"?, "version"?, "hash-algo-id"?}]}], "realm": [...]}``, the acceptable
  firmware states of each platform implementation (the ``realm`` entries are read for
  format only: realm measurements are judged by the attestation policy, as upstream's
  verifier leaves them to it).

Configuration (read once at start-up; edit the stores, then restart):

```toml
[attestation_service.verifier_config.cca]
type = "local"
ta-store = "/etc/kbs/cca/tastore.json"
rv-store = "/etc/kbs/cca/rvstore.json"
```

With no ``cca`` section, upstream's ``CCA_CONFIG_FILE`` environment variable is honoured: it
names upstream's JSON file ``{"cca-verifier": {"type": "local", "ta-store": …, "rv-store":
…}}``, whose ``cca-verifier`` table becomes the ``cca`` section when the configuration is
loaded (``keybroker.config_env``). With neither, the verifier refuses every CCA token (no
trusted platform).

Remote mode hands the platform's appraisal to a Veraison service
(:mod:`keybroker.verifiers.arm.veraison`):

```toml
[attestation_service.verifier_config.cca]
type = "remote"
address = "https://veraison.example:8443"
ca-cert = "/etc/kbs/veraison-ca.pem"  # optional: the CA of the service's TLS certificate
timeout = 10                          # Keybroker's: seconds per request
insecure_http = false                 # Keybroker's: allow an http:// address (tests only)
```
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keybroker.errors import ConfigError
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.arm.cca_token import SwComponent

log = logging.getLogger(__name__)

MAX_STORE_BYTES = 4 * 1024 * 1024
_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CcaLocalSettings(_Model):
    type: Literal["local"]
    ta_store: Path = Field(alias="ta-store")
    rv_store: Path = Field(alias="rv-store")


class CcaRemoteSettings(_Model):
    type: Literal["remote"]
    address: str
    ca_cert: Path | None = Field(default=None, alias="ca-cert")
    timeout: float = Field(default=10.0, gt=0, le=300)
    insecure_http: bool = False


class _UpstreamFile(_Model):
    cca_verifier: CcaLocalSettings | CcaRemoteSettings = Field(
        alias="cca-verifier", discriminator="type"
    )


class _Jwk(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    kty: Literal["EC"]
    crv: str
    x: str
    y: str


class _TrustAnchor(_Model):
    pkey: _Jwk
    implementation_id: str = Field(alias="implementation-id", pattern=r"^([0-9a-fA-F]{2}){32}$")
    instance_id: str = Field(alias="instance-id", pattern=r"^01([0-9a-fA-F]{2}){32}$")


class _SwComponentRv(_Model):
    measurement_value: str = Field(alias="measurement-value")
    signer_id: str = Field(alias="signer-id")
    component_type: str | None = Field(default=None, alias="component-type")
    version: str | None = None
    hash_algo_id: str | None = Field(default=None, alias="hash-algo-id")


class _PlatformRv(_Model):
    implementation_id: str = Field(alias="implementation-id", pattern=r"^([0-9a-fA-F]{2}){32}$")
    platform_configuration: str = Field(alias="platform-configuration")
    sw_components: list[_SwComponentRv] = Field(alias="sw-components", min_length=1)


class _RealmRv(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)
    initial_measurement: str = Field(alias="initial-measurement")


class _RvFile(_Model):
    platform: list[_PlatformRv] = Field(default_factory=list)
    realm: list[_RealmRv] = Field(default_factory=list)


@dataclass(frozen=True)
class ComponentReference:
    """One endorsed firmware component; type and version must match only when endorsed."""

    measurement_value: bytes
    signer_id: bytes
    measurement_type: str | None
    version: str | None

    def matches(self, component: SwComponent) -> bool:
        if (self.measurement_value, self.signer_id) != (
            component.measurement_value,
            component.signer_id,
        ):
            return False
        wanted_type = self.measurement_type
        if wanted_type is not None and wanted_type != component.measurement_type:
            return False
        return self.version is None or self.version == component.version


@dataclass(frozen=True)
class PlatformReference:
    """One acceptable firmware state of a platform implementation."""

    config: bytes
    sw_components: tuple[ComponentReference, ...]

    def matches(self, config: bytes, components: tuple[SwComponent, ...]) -> bool:
        return (
            self.config == config
            and len(self.sw_components) == len(components)
            and all(r.matches(c) for r, c in zip(self.sw_components, components, strict=True))
        )


@dataclass(frozen=True)
class TrustAnchor:
    cpak: ec.EllipticCurvePublicKey
    implementation_id: bytes


@dataclass(frozen=True)
class CcaEndorsements:
    """CPAKs by instance id, platform reference values by implementation id."""

    trust_anchors: Mapping[bytes, TrustAnchor]
    platforms: Mapping[bytes, tuple[PlatformReference, ...]]


def _problems(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in e.errors()[:5]
    )


def _read_json(path: Path, what: str) -> JsonValue:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_STORE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the CCA {what} {path}: {e.strerror}") from e
    if len(data) > MAX_STORE_BYTES:
        raise ConfigError(f"the CCA {what} {path} is larger than {MAX_STORE_BYTES} bytes")
    try:
        value: JsonValue = json.loads(data)
    except ValueError as e:
        raise ConfigError(f"the CCA {what} {path} is not JSON: {e}") from None
    return value


def _hex(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{what} is not hex: {text[:80]!r}") from None


def _b64url(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what} is not base64url") from None


def _cpak(jwk: _Jwk, where: str) -> ec.EllipticCurvePublicKey:
    curve = _CURVES.get(jwk.crv)
    if curve is None:
        raise ConfigError(f"{where}: CPAK curve {jwk.crv!r} is not P-256, P-384 or P-521")
    width = (curve.key_size + 7) // 8
    x, y = _b64url(jwk.x, f"{where} x"), _b64url(jwk.y, f"{where} y")
    if len(x) != width or len(y) != width:
        raise ConfigError(f"{where}: CPAK coordinates are not {width} bytes")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
    except ValueError:
        raise ConfigError(f"{where}: CPAK is not a point on {jwk.crv}") from None


def load_trust_anchors(path: Path) -> dict[bytes, TrustAnchor]:
    try:
        entries = [_TrustAnchor.model_validate(e) for e in _list(_read_json(path, "ta-store"))]
    except ValidationError as e:
        raise ConfigError(f"the CCA ta-store {path}: {_problems(e)}") from None
    anchors: dict[bytes, TrustAnchor] = {}
    for i, entry in enumerate(entries):
        where = f"the CCA ta-store {path} entry {i}"
        instance = _hex(entry.instance_id, f"{where} instance-id")
        if instance in anchors:
            raise ConfigError(f"{where}: instance-id {entry.instance_id} is listed twice")
        anchors[instance] = TrustAnchor(
            _cpak(entry.pkey, where), _hex(entry.implementation_id, f"{where} implementation-id")
        )
    return anchors


def _list(value: JsonValue) -> list[JsonValue]:
    if not isinstance(value, list):
        raise ConfigError("a CCA ta-store must be a JSON list of trust anchors")
    return value


def _component(rv: _SwComponentRv, where: str) -> ComponentReference:
    return ComponentReference(
        _hex(rv.measurement_value, f"{where} measurement-value"),
        _hex(rv.signer_id, f"{where} signer-id"),
        rv.component_type,
        rv.version,
    )


def load_reference_values(path: Path) -> dict[bytes, tuple[PlatformReference, ...]]:
    try:
        store = _RvFile.model_validate(_read_json(path, "rv-store"))
    except ValidationError as e:
        raise ConfigError(f"the CCA rv-store {path}: {_problems(e)}") from None
    platforms: dict[bytes, list[PlatformReference]] = {}
    for i, entry in enumerate(store.platform):
        where = f"the CCA rv-store {path} platform {i}"
        reference = PlatformReference(
            _hex(entry.platform_configuration, f"{where} platform-configuration"),
            tuple(_component(c, f"{where} sw-component") for c in entry.sw_components),
        )
        impl = _hex(entry.implementation_id, f"{where} implementation-id")
        platforms.setdefault(impl, []).append(reference)
    return {k: tuple(v) for k, v in platforms.items()}


def cca_settings(
    verifier_config: Mapping[str, Any] | None,
) -> CcaLocalSettings | CcaRemoteSettings | None:
    """``[attestation_service.verifier_config.cca]`` (which upstream's ``CCA_CONFIG_FILE``
    fills when unset); None without it."""
    section = (verifier_config or {}).get("cca")
    if section is None:
        return None
    try:
        return _UpstreamFile.model_validate({"cca-verifier": section}).cca_verifier
    except ValidationError as e:
        raise ConfigError(f"[attestation_service.verifier_config.cca] {_problems(e)}") from None


def load_endorsements(settings: CcaLocalSettings) -> CcaEndorsements:
    """Both stores the local settings name, loaded now."""
    endorsements = CcaEndorsements(
        load_trust_anchors(settings.ta_store), load_reference_values(settings.rv_store)
    )
    log.info(
        "CCA verifier: %d trusted platform instance(s), %d endorsed implementation(s)",
        len(endorsements.trust_anchors),
        len(endorsements.platforms),
    )
    return endorsements


def build_cca_endorsements(verifier_config: Mapping[str, Any] | None) -> CcaEndorsements | None:
    """The local endorsements the configuration names; None when CCA is not configured.
    A remote configuration is refused here: see ``cca.build_cca_verifier``."""
    settings = cca_settings(verifier_config)
    if isinstance(settings, CcaRemoteSettings):
        raise ConfigError("the CCA verifier is configured as `remote`: it has no local stores")
    return None if settings is None else load_endorsements(settings)
