"""HTTPS: the server's TLS context from ``[http_server]`` (upstream's profiles and keys).

Profiles: ``modern`` (TLS 1.3 only), ``intermediate`` (the default: TLS 1.2 with forward-secret
AEAD suites, and TLS 1.3), ``old`` (TLS 1.2 with CBC suites too, and TLS 1.3), ``custom``
(``tls_min_version``, ``tls_max_version``, ``tls_ciphers``, ``tls_groups``). Custom fields set
with another profile override it, with a warning, as upstream.

What Python's ``ssl`` module cannot express is never dropped silently: restricting TLS 1.3
cipher suites and choosing key-exchange groups (including post-quantum hybrids such as
X25519MLKEM768) fall back to OpenSSL's defaults with a warning that names what was asked for.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keybroker.config import HttpServerConfig, TlsProfile
from keybroker.errors import ConfigError

log = logging.getLogger(__name__)

_INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    )
)
_OLD_CIPHERS = _INTERMEDIATE_CIPHERS + ":ECDHE+AES:DHE+AES:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_PROFILES = {
    TlsProfile.MODERN: ("1.3", "1.3", None),
    TlsProfile.INTERMEDIATE: ("1.2", "1.3", _INTERMEDIATE_CIPHERS),
    TlsProfile.OLD: ("1.2", "1.3", _OLD_CIPHERS),
    TlsProfile.CUSTOM: ("1.2", "1.3", _INTERMEDIATE_CIPHERS),
}


def server_context(http: HttpServerConfig) -> ssl.SSLContext:
    if http.private_key is None or http.certificate is None:
        raise ConfigError(
            "HTTPS needs [http_server] private_key and certificate "
            "(`kbs self-signed-cert` makes a pair for tests), or insecure_http = true"
        )
    custom = [
        name
        for name in ("tls_min_version", "tls_max_version", "tls_ciphers", "tls_groups")
        if getattr(http, name) is not None
    ]
    if custom and http.tls_profile is not TlsProfile.CUSTOM:
        log.warning(
            "tls_profile = %s but %s set: they override the profile",
            http.tls_profile.value,
            ", ".join(custom),
        )
    default_min, default_max, default_ciphers = _PROFILES[http.tls_profile]
    minimum = http.tls_min_version or default_min
    maximum = http.tls_max_version or default_max
    if _VERSIONS[minimum] > _VERSIONS[maximum]:
        raise ConfigError(f"tls_min_version {minimum} is above tls_max_version {maximum}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[minimum]
    context.maximum_version = _VERSIONS[maximum]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _ciphers(context, http.tls_ciphers, default_ciphers)
    _groups(http.tls_groups)
    try:
        context.load_cert_chain(str(http.certificate), str(http.private_key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"cannot load the HTTPS certificate {http.certificate} and key {http.private_key}: "
            f"{getattr(e, 'strerror', None) or e}"
        ) from None
    return context


def _ciphers(context: ssl.SSLContext, configured: str | None, default: str | None) -> None:
    names = [n for n in (configured or default or "").split(":") if n]
    tls13 = [n for n in names if n.startswith("TLS_")]
    tls12 = [n for n in names if not n.startswith("TLS_")]
    if tls12:
        try:
            context.set_ciphers(":".join(tls12))
        except ssl.SSLError:
            raise ConfigError(f"OpenSSL accepts none of the TLS 1.2 ciphers {tls12}") from None
    if tls13:
        log.warning(
            "tls_ciphers lists TLS 1.3 suites (%s): Python's ssl module cannot restrict them, "
            "so OpenSSL's TLS 1.3 defaults are used (all AEAD)",
            ":".join(tls13),
        )


def _groups(configured: str | None) -> None:
    if not configured:
        return
    post_quantum = [
        g for g in configured.split(":") if "MLKEM" in g.upper() or "KYBER" in g.upper()
    ]
    log.warning(
        "tls_groups = %s cannot be applied by Python's ssl module%s: OpenSSL's default groups "
        "are used instead",
        configured,
        f" (and post-quantum {', '.join(post_quantum)} is not available with {ssl.OPENSSL_VERSION})"
        if post_quantum
        else "",
    )


def self_signed_certificate(names: list[str], *, days: int = 30) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for a test server reachable under ``names`` (DNS or IP)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alternative: list[x509.GeneralName] = []
    for name in names:
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative.append(x509.DNSName(name))
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)
