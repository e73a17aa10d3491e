"""Start-up check of the private key files ``kbs`` reads: the HTTPS key and the token signer's.

A private key that other users of the machine can read is a key they may already hold: they
could impersonate the KBS over TLS or mint attestation tokens it trusts. ``kbs`` therefore
refuses to start when such a file is readable or writable by "others" (``chmod o-rwx``), unless
the top-level ``insecure_key_permissions = true`` says the operator accepts it (then a warning
is logged at every start). Group access is logged as a warning but accepted: a group that holds
the key is an operator's deliberate choice (Debian's ``ssl-cert``, a Kubernetes secret mounted
with ``defaultMode: 0440`` and ``fsGroup``).

What is checked is the file a path finally names (links followed, as when the key is read).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from keybroker.config import BuiltinAsConfig, KbsConfig
from keybroker.errors import ConfigError

log = logging.getLogger(__name__)

_OTHERS = stat.S_IRWXO
_GROUP = stat.S_IRWXG


def private_key_files(config: KbsConfig) -> list[tuple[str, Path]]:
    """``(what, path)`` of every private key file this configuration makes ``kbs`` read."""
    keys: list[tuple[str, Path]] = []
    http = config.http_server
    if not http.insecure_http and http.private_key is not None:
        keys.append(("[http_server] private_key", http.private_key))
    service = config.attestation_service
    if isinstance(service, BuiltinAsConfig) and service.attestation_token_broker.signer:
        signer = service.attestation_token_broker.signer
        keys.append(
            ("[attestation_service.attestation_token_broker.signer] key_path", signer.key_path)
        )
    return keys


def check_private_key_permissions(config: KbsConfig) -> None:
    """Raise ConfigError for a private key file others may read or write (see above)."""
    for what, path in private_key_files(config):
        check_key_file(what, path, insecure=config.insecure_key_permissions)


def check_key_file(what: str, path: Path, *, insecure: bool = False) -> None:
    """Raise ConfigError when others may read or write the private key ``path``, unless
    ``insecure`` (then warn); warn when its group may. ``what`` names it in the messages."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return  # a missing key is reported, with its reason, where it is loaded
    if mode & _OTHERS:
        if not insecure:
            raise ConfigError(
                f"{what} {path} is accessible to other users (mode {mode:04o}): run "
                f"`chmod o-rwx {path}` (600 is best), or set the top-level "
                "insecure_key_permissions = true to start anyway"
            )
        log.warning(
            "insecure_key_permissions = true: %s %s is accessible to other users "
            "(mode %04o); anyone on this machine may hold this key",
            what,
            path,
            mode,
        )
    elif mode & _GROUP:
        log.warning(
            "%s %s is accessible to its group (mode %04o): every member may hold this key",
            what,
            path,
            mode,
        )
