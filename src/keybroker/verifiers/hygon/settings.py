"""Where the Hygon verifiers get HSK/CEK certificates:
``[attestation_service.verifier_config.hygon]``.

```toml
[attestation_service.verifier_config.hygon]
kds_url = "https://cert.hygon.cn"   # Hygon's KDS (the default), or a mirror with its path
ca_cert = "/etc/kbs/hygon-kds-ca.pem"  # the CA of a mirror's TLS certificate, if not public
offline_dir = "/opt/hygon/csv"      # <dir>/hsk_cek/<chip id>/hsk_cek.cert, tried first
                                    # (upstream's layout and default); alone without kds_url
cache_dir = "/var/cache/kbs/hygon"  # keep fetched HSK/CEK files for good
timeout = 10
insecure_http = false               # a mirror over plain HTTP: tests only
```

With no section at all, as upstream: upstream's offline directory ``/opt/hygon/csv`` first,
then Hygon's KDS. The verifiers never open sockets themselves: they call the fetcher built
here, in a worker thread. Upstream has no configuration for this (both paths are hard-coded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keybroker.errors import ConfigError
from keybroker.verifiers.hygon.collateral import (
    UPSTREAM_OFFLINE_DIR,
    HskCekFallbackFetcher,
    HskCekFetcher,
    HygonDirectoryFetcher,
)
from keybroker.verifiers.hygon.kds_fetcher import (
    HYGON_KDS_URL,
    HskCekCachingFetcher,
    HygonKdsFetcher,
)

SECTION = "hygon"


class HygonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kds_url: str | None = None
    ca_cert: Path | None = None
    offline_dir: Path | None = None
    cache_dir: Path | None = None
    timeout: float = Field(default=10.0, gt=0, le=300)
    insecure_http: bool = False


def hygon_settings(verifier_config: dict[str, Any] | None) -> HygonSettings:
    try:
        return HygonSettings.model_validate((verifier_config or {}).get(SECTION, {}))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in e.errors()
        )
        raise ConfigError(f"[attestation_service.verifier_config.{SECTION}] {problems}") from None


def build_hygon_fetcher(verifier_config: dict[str, Any] | None) -> HskCekFetcher:
    """The HSK/CEK source the configuration describes (nothing is fetched here)."""
    settings = hygon_settings(verifier_config)
    configured = "hygon" in (verifier_config or {})
    sources: list[HskCekFetcher] = [
        HygonDirectoryFetcher(settings.offline_dir or UPSTREAM_OFFLINE_DIR)
    ]
    if settings.kds_url is not None or settings.offline_dir is None or not configured:
        try:
            ca_pem = settings.ca_cert.read_bytes() if settings.ca_cert else None
        except OSError as e:
            raise ConfigError(f"cannot read hygon ca_cert {settings.ca_cert}: {e.strerror}") from e
        sources.append(
            HygonKdsFetcher(
                settings.kds_url or HYGON_KDS_URL,
                timeout=settings.timeout,
                ca_pem=ca_pem,
                insecure_http=settings.insecure_http,
            )
        )
    fetcher: HskCekFetcher = sources[0] if len(sources) == 1 else HskCekFallbackFetcher(sources)
    if settings.cache_dir is not None:
        fetcher = HskCekCachingFetcher(fetcher, settings.cache_dir)
    return fetcher
