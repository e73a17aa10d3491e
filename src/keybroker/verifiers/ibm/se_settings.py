"""Where the SE verifier finds its material: ``[attestation_service.verifier_config.se]``.

```toml
[attestation_service.verifier_config.se]
host_key_documents_dir = "/run/confidential-containers/ibmse/hkds"
certificates_dir = "/run/confidential-containers/ibmse/certs"   # IBM signing key + intermediate
crls_dir = "/run/confidential-containers/ibmse/crls"
root_ca = "/run/confidential-containers/ibmse/root_ca.crt"      # absent: DigiCert Trusted Root G4
image_header = "/run/confidential-containers/ibmse/hdr/hdr.bin"
measurement_key_private = "/run/confidential-containers/ibmse/rsa/encrypt_key.pem"
measurement_key_public = "/run/confidential-containers/ibmse/rsa/encrypt_key.pub"
insecure_skip_certs_verification = false                        # tests only
```

Upstream Trustee configures the SE verifier through environment variables only, so each key
falls back to upstream's variable (``DEFAULT_SE_HOST_KEY_DOCUMENTS_ROOT``,
``SE_CERTIFICATES_ROOT``, ``SE_CERTIFICATE_REVOCATION_LISTS_ROOT``, ``SE_CERTIFICATE_ROOT_CA``,
``SE_IMAGE_HEADER_FILE``, ``SE_MEASUREMENT_ENCR_KEY_PRIVATE``,
``SE_MEASUREMENT_ENCR_KEY_PUBLIC``, ``SE_SKIP_CERTS_VERIFICATION``), then to upstream's default
path. The environment is read once, here, when the verifiers are built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from keybroker.errors import ConfigError

SE_ROOT = Path("/run/confidential-containers/ibmse")

# key -> (upstream environment variable, upstream default)
_UPSTREAM: dict[str, tuple[str, Path]] = {
    "host_key_documents_dir": ("DEFAULT_SE_HOST_KEY_DOCUMENTS_ROOT", SE_ROOT / "hkds"),
    "certificates_dir": ("SE_CERTIFICATES_ROOT", SE_ROOT / "certs"),
    "crls_dir": ("SE_CERTIFICATE_REVOCATION_LISTS_ROOT", SE_ROOT / "crls"),
    "root_ca": ("SE_CERTIFICATE_ROOT_CA", SE_ROOT / "root_ca.crt"),
    "image_header": ("SE_IMAGE_HEADER_FILE", SE_ROOT / "hdr" / "hdr.bin"),
    "measurement_key_private": ("SE_MEASUREMENT_ENCR_KEY_PRIVATE", SE_ROOT / "rsa/encrypt_key.pem"),
    "measurement_key_public": ("SE_MEASUREMENT_ENCR_KEY_PUBLIC", SE_ROOT / "rsa/encrypt_key.pub"),
}
_SKIP_ENV = "SE_SKIP_CERTS_VERIFICATION"


class SeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    host_key_documents_dir: Path
    certificates_dir: Path
    crls_dir: Path
    root_ca: Path
    image_header: Path
    measurement_key_private: Path
    measurement_key_public: Path
    insecure_skip_certs_verification: bool = False


def se_settings(
    verifier_config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> SeSettings:
    environ = os.environ if environ is None else environ
    section = dict((verifier_config or {}).get("se", {}))
    for key, (variable, default) in _UPSTREAM.items():
        section.setdefault(key, environ.get(variable) or default)
    if "insecure_skip_certs_verification" not in section and _SKIP_ENV in environ:
        section["insecure_skip_certs_verification"] = environ[_SKIP_ENV].lower() == "true"
    try:
        return SeSettings.model_validate(section)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in e.errors()
        )
        raise ConfigError(f"[attestation_service.verifier_config.se] {problems}") from None
