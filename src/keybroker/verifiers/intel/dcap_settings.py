"""Collateral for the TDX and SGX verifiers: ``[attestation_service.verifier_config.dcap]``.

```toml
[attestation_service.verifier_config.dcap]
collateral_service = "https://pccs.internal:8081"  # a PCCS; default: Intel's PCS
tcb_update = "early"            # Intel's TCB update stream: early (upstream's choice) or standard
ca_cert = "/etc/kbs/pccs-ca.pem"  # the CA of a PCCS's TLS certificate, if not a public one
cache_dir = "/var/cache/kbs/dcap" # also keep collateral on disk until nextUpdate (recommended)
offline_dir = "/etc/kbs/dcap"     # instead of a service: collateral files laid out per FMSPC
timeout = 10
insecure_http = false             # a PCCS over plain HTTP (replayable collateral): tests only
```

Keybroker's own section (upstream configures Intel's library through
``/etc/sgx_default_qcnl.conf``). The verifier never opens a socket itself: it calls the fetcher
built here, in a worker thread.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keybroker.errors import ConfigError
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.intel.dcap import Quote
from keybroker.verifiers.intel.dcap_collateral import collateral_request, verify_collateral
from keybroker.verifiers.intel.dcap_fetcher import (
    CachingFetcher,
    CollateralFetcher,
    DirectoryFetcher,
    PcsFetcher,
)


class DcapSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    collateral_service: str | None = None
    tcb_update: Literal["early", "standard"] = "early"
    ca_cert: Path | None = None
    cache_dir: Path | None = None
    offline_dir: Path | None = None
    timeout: float = Field(default=10.0, gt=0, le=300)
    insecure_http: bool = False


def dcap_settings(verifier_config: dict[str, Any] | None) -> DcapSettings:
    section = (verifier_config or {}).get("dcap", {})
    try:
        return DcapSettings.model_validate(section)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in e.errors()
        )
        raise ConfigError(f"[attestation_service.verifier_config.dcap] {problems}") from None


def build_fetcher(
    settings: DcapSettings, clock: Callable[[], float] = time.time
) -> CollateralFetcher:
    fetcher: CollateralFetcher
    if settings.offline_dir is not None:
        if settings.collateral_service is not None:
            raise ConfigError("set either dcap collateral_service or offline_dir, not both")
        fetcher = DirectoryFetcher(settings.offline_dir)
    elif settings.collateral_service is None:
        fetcher = PcsFetcher.intel(update=settings.tcb_update, timeout=settings.timeout)
    else:
        try:
            ca_pem = settings.ca_cert.read_bytes() if settings.ca_cert else None
        except OSError as e:
            raise ConfigError(f"cannot read dcap ca_cert {settings.ca_cert}: {e.strerror}") from e
        fetcher = PcsFetcher(
            settings.collateral_service,
            update=settings.tcb_update,
            timeout=settings.timeout,
            ca_pem=ca_pem,
            insecure_http=settings.insecure_http,
        )
    # always cached in memory (bounded, one fetch per item at a time); on disk given cache_dir
    return CachingFetcher(
        fetcher,
        settings.cache_dir,
        clock=lambda: datetime.datetime.fromtimestamp(clock(), datetime.UTC),
    )


class CollateralAppraiser:
    """The TcbAppraiser of the TDX and SGX verifiers: fetch, verify, report the claims."""

    def __init__(self, fetcher: CollateralFetcher) -> None:
        self._fetcher = fetcher

    def appraise(
        self, quote: Quote, pck: x509.Certificate, now: datetime.datetime
    ) -> dict[str, JsonValue]:
        collateral = self._fetcher.fetch(collateral_request(quote, pck))
        return verify_collateral(quote, collateral, now).claims()
