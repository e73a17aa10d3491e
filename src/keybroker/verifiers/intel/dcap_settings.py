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

Keybroker's own section. Upstream's ``[attestation_service.verifier_config.dcap_verifier]``
(``collateral_service``, ``tcb_update_type``, ``use_secure_cert``) is read too, mapped onto these
settings (set one of the two sections): Intel's PCS URL means the default, any other URL a
PCCS. Upstream parses ``use_secure_cert`` but always verifies the PCCS's TLS certificate, and so
does Keybroker: ``false`` is logged and changes nothing (a PCCS with a private CA needs
Keybroker's section and its ``ca_cert``).
Upstream's ``file://`` collateral file (Intel's PCS Client Tool output) is not read: it is
refused, pointing at ``dcap.offline_dir``. The verifier never opens a socket itself: it calls
the fetcher built here, in a worker thread.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keybroker.errors import ConfigError, UnsupportedFeatureError
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.intel.dcap import Quote
from keybroker.verifiers.intel.dcap_collateral import collateral_request, verify_collateral
from keybroker.verifiers.intel.dcap_fetcher import (
    CachingFetcher,
    CollateralFetcher,
    DirectoryFetcher,
    PcsFetcher,
)

log = logging.getLogger("keybroker.verifiers.intel")


class DcapSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    collateral_service: str | None = None
    tcb_update: Literal["early", "standard"] = "early"
    ca_cert: Path | None = None
    cache_dir: Path | None = None
    offline_dir: Path | None = None
    timeout: float = Field(default=10.0, gt=0, le=300)
    insecure_http: bool = False


class UpstreamQcnlSettings(BaseModel):
    """Upstream's ``verifier_config.dcap_verifier`` (its ``QcnlConfig``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    collateral_service: str
    use_secure_cert: bool | None = None
    tcb_update_type: Literal["early", "standard"] = "early"


def _validated(model: type[BaseModel], section: object, name: str) -> Any:
    try:
        return model.model_validate(section)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in e.errors()
        )
        raise ConfigError(f"[attestation_service.verifier_config.{name}] {problems}") from None


def dcap_settings(verifier_config: dict[str, Any] | None) -> DcapSettings:
    config = verifier_config or {}
    if "dcap" in config and "dcap_verifier" in config:
        raise ConfigError(
            "set [attestation_service.verifier_config.dcap] or upstream's dcap_verifier, not both"
        )
    if "dcap_verifier" in config:
        upstream = _validated(UpstreamQcnlSettings, config["dcap_verifier"], "dcap_verifier")
        return _from_upstream(upstream)
    settings: DcapSettings = _validated(DcapSettings, config.get("dcap", {}), "dcap")
    return settings


def _from_upstream(upstream: UpstreamQcnlSettings) -> DcapSettings:
    service = upstream.collateral_service.strip()
    if service.lower().startswith("file:"):
        raise UnsupportedFeatureError(
            "verifier_config.dcap_verifier.collateral_service file:// (a PCS Client Tool file) "
            "is not read by Keybroker: lay the collateral out per FMSPC and set "
            "verifier_config.dcap.offline_dir instead"
        )
    if upstream.use_secure_cert is False:
        log.warning(
            "verifier_config.dcap_verifier.use_secure_cert = false is ignored, as upstream "
            "ignores it: the TLS certificate of %s is verified (for a PCCS with a private CA, "
            "use Keybroker's verifier_config.dcap with ca_cert instead)",
            service,
        )
    host = service.split("://", 1)[-1].split("/", 1)[0].lower()
    return DcapSettings(
        collateral_service=None if host == "api.trustedservices.intel.com" else service,
        tcb_update=upstream.tcb_update_type,
    )


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
