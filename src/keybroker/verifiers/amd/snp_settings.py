"""Collateral for the SNP verifier: ``[attestation_service.verifier_config.snp]``.

```toml
[attestation_service.verifier_config.snp]
kds_url = "https://kdsintf.amd.com"  # AMD KDS (the default), or a mirror serving KDS's paths
ca_cert = "/etc/kbs/kds-ca.pem"      # the CA of a mirror's TLS certificate, if not a public one
cache_dir = "/var/cache/kbs/snp"     # also on disk: VCEKs for good, CRLs until nextUpdate
offline_dir = "/etc/kbs/kds-store"   # VCEKs and CRLs prepared offline (tried before kds_url;
                                     # alone when kds_url is not set)
timeout = 10
insecure_http = false                # a mirror over plain HTTP (replayable CRLs): tests only
insecure_skip_crl = false            # never check the ARK's CRL (revoked ASKs pass): tests only
```

Upstream Trustee's own section is read too, so an operator's upstream configuration keeps
working: ``[attestation_service.verifier_config.snp_verifier] vcek_sources = [{type = "KDS",
base_url = "…"}, {type = "OfflineStore", path = "…"}]`` (tried in order, as upstream does).
Only one of the two sections may be given. The verifier never opens a socket itself: it calls
the fetcher built here, in a worker thread.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keybroker.errors import ConfigError
from keybroker.verifiers.amd.snp import SnpAppraiser
from keybroker.verifiers.amd.snp_fetcher import (
    AMD_KDS_URL,
    KdsFetcher,
    SnpCachingFetcher,
    SnpCollateralFetcher,
    SnpDirectoryFetcher,
    SnpFallbackFetcher,
)

# upstream's default for an OfflineStore source without a path
UPSTREAM_OFFLINE_STORE = Path("/opt/confidential-containers/attestation-service/kds-store")


class SnpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kds_url: str | None = None
    ca_cert: Path | None = None
    cache_dir: Path | None = None
    offline_dir: Path | None = None
    timeout: float = Field(default=10.0, gt=0, le=300)
    insecure_http: bool = False
    insecure_skip_crl: bool = False


class _UpstreamSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["KDS", "OfflineStore"]
    base_url: str | None = None
    path: Path | None = None


class _UpstreamSnpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    vcek_sources: list[_UpstreamSource] = Field(
        default_factory=lambda: [_UpstreamSource(type="KDS")]
    )


def _problems(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in e.errors()
    )


def _validated(model: type[BaseModel], section: object, name: str) -> Any:
    try:
        return model.model_validate(section)
    except ValidationError as e:
        raise ConfigError(f"[attestation_service.verifier_config.{name}] {_problems(e)}") from None


def _ca_pem(settings: SnpSettings) -> bytes | None:
    try:
        return settings.ca_cert.read_bytes() if settings.ca_cert else None
    except OSError as e:
        raise ConfigError(f"cannot read snp ca_cert {settings.ca_cert}: {e.strerror}") from e


def _sources(settings: SnpSettings) -> list[SnpCollateralFetcher]:
    sources: list[SnpCollateralFetcher] = []
    if settings.offline_dir is not None:
        sources.append(SnpDirectoryFetcher(settings.offline_dir))
    if settings.kds_url is not None or settings.offline_dir is None:
        sources.append(
            KdsFetcher(
                settings.kds_url or AMD_KDS_URL,
                timeout=settings.timeout,
                ca_pem=_ca_pem(settings),
                insecure_http=settings.insecure_http,
            )
        )
    return sources


def _upstream_sources(config: _UpstreamSnpConfig) -> list[SnpCollateralFetcher]:
    if not config.vcek_sources:
        raise ConfigError("[attestation_service.verifier_config.snp_verifier] has no vcek_sources")
    sources: list[SnpCollateralFetcher] = []
    for source in config.vcek_sources:
        if source.type == "KDS":
            sources.append(KdsFetcher(source.base_url or AMD_KDS_URL))
        else:
            sources.append(SnpDirectoryFetcher(source.path or UPSTREAM_OFFLINE_STORE))
    return sources


def build_snp_fetcher(
    verifier_config: dict[str, Any] | None, clock: Callable[[], float] = time.time
) -> tuple[SnpCachingFetcher, SnpSettings]:
    """The collateral source the configuration describes, behind the cache."""
    config = verifier_config or {}
    if "snp" in config and "snp_verifier" in config:
        raise ConfigError(
            "set [attestation_service.verifier_config.snp] or upstream's snp_verifier, not both"
        )
    if "snp_verifier" in config:
        upstream = _validated(_UpstreamSnpConfig, config["snp_verifier"], "snp_verifier")
        settings = SnpSettings()
        sources = _upstream_sources(upstream)
    else:
        settings = _validated(SnpSettings, config.get("snp", {}), "snp")
        sources = _sources(settings)
    fetcher = sources[0] if len(sources) == 1 else SnpFallbackFetcher(sources)
    # always cached in memory (bounded, one KDS request per item at a time); on disk given
    # cache_dir
    cached = SnpCachingFetcher(
        fetcher,
        settings.cache_dir,
        clock=lambda: datetime.datetime.fromtimestamp(clock(), datetime.UTC),
    )
    return cached, settings


def build_snp_appraiser(
    verifier_config: dict[str, Any] | None, clock: Callable[[], float] = time.time
) -> SnpAppraiser:
    """The SNP verifier's appraiser, from ``[attestation_service.verifier_config]``. Nothing
    here touches the network: collateral is fetched when a report is verified."""
    fetcher, settings = build_snp_fetcher(verifier_config, clock)
    return SnpAppraiser(fetcher, insecure_skip_crl=settings.insecure_skip_crl)
