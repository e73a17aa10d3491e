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
path. Those variables are mapped into this section when the configuration is loaded
(``keybroker.config_env``): this module reads the section only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from keybroker.errors import ConfigError

SE_ROOT = Path("/run/confidential-containers/ibmse")

# key -> upstream's default
_UPSTREAM_DEFAULTS: dict[str, Path] = {
    "host_key_documents_dir": SE_ROOT / "hkds",
    "certificates_dir": SE_ROOT / "certs",
    "crls_dir": SE_ROOT / "crls",
    "root_ca": SE_ROOT / "root_ca.crt",
    "image_header": SE_ROOT / "hdr" / "hdr.bin",
    "measurement_key_private": SE_ROOT / "rsa/encrypt_key.pem",
    "measurement_key_public": SE_ROOT / "rsa/encrypt_key.pub",
}


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


def se_settings(verifier_config: Mapping[str, Any] | None) -> SeSettings:
    section = dict((verifier_config or {}).get("se", {}))
    for key, default in _UPSTREAM_DEFAULTS.items():
        section.setdefault(key, default)
    try:
        return SeSettings.model_validate(section)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in e.errors()
        )
        raise ConfigError(f"[attestation_service.verifier_config.se] {problems}") from None
