"""Secret backend in a PKCS#11 token (an HSM, or SoftHSM2 for tests), versioned.

The secret bytes stay in the HSM; the version record lives in the KBS's own key-value store.
This is :class:`~keybroker.storage.secrets.KvSecretBackend` (so
:mod:`keybroker.storage.versions` numbers, rolls back, soft-deletes and purges exactly as for
the key-value backends) over three stores:

- resource ``repo/type/tag``'s current bytes: the token object labelled ``repo/type/tag``
  (upstream Trustee's ``pkcs11`` plugin layout, so it and an upstream KBS read the current value);
- the bytes of each version: token objects labelled ``repo/type/tag/<id>``;
- the version records: namespace ``pkcs11_meta_<token serial>`` of the configured
  ``[storage_backend]`` (memory, LocalFs, LocalJson, PostgreSQL, Redis), whose
  compare-and-set allocates version numbers. A token has none, so the record cannot live there.

Replicas sharing one HSM number versions safely when they also share that store (PostgreSQL or
Redis). The namespace is keyed by the token's serial number, not a fixed name: records of one
token never name objects of another (the ``resource`` plugin and upstream's ``pkcs11`` plugin
may sit on different tokens), and never collide with the kvstorage backend's
``repository_meta``. With the in-memory store the records go with the process: after a restart
the current value is still served (as version 1, from its ``repo/type/tag`` object) and the
next write numbers from there.

Objects written before versioning (by upstream, or an earlier Keybroker) have no record: each
is served as version 1, and the first versioned write copies it to version 1 and adds version 2.
"""

from __future__ import annotations

from collections.abc import Callable

from keybroker.storage.base import KeyValueStorage
from keybroker.storage.pkcs11_token import Pkcs11Config, Pkcs11KeyValueStorage, Pkcs11Token
from keybroker.storage.secrets import DEFAULT_MAX_RESOURCE_BYTES, KvSecretBackend
from keybroker.storage.versions import DEFAULT_MAX_VERSIONS

__all__ = ["Pkcs11Config", "Pkcs11SecretBackend", "meta_namespace"]


def meta_namespace(token: Pkcs11Token) -> str:
    """The key-value namespace of the version records of ``token``'s resources."""
    return f"pkcs11_meta_{token.identity}"


class Pkcs11SecretBackend(KvSecretBackend):
    def __init__(
        self,
        token: Pkcs11Token,
        *,
        meta: KeyValueStorage,
        max_versions: int = DEFAULT_MAX_VERSIONS,
        max_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
    ) -> None:
        super().__init__(
            Pkcs11KeyValueStorage(token, depth=3),
            meta=meta,
            versions=Pkcs11KeyValueStorage(token, depth=4, stamped_only=True),
            max_versions=max_versions,
            max_bytes=max_bytes,
        )
        self.token = token

    @classmethod
    def from_config(
        cls,
        config: Pkcs11Config,
        *,
        namespace: Callable[[str], KeyValueStorage],
        max_versions: int = DEFAULT_MAX_VERSIONS,
    ) -> Pkcs11SecretBackend:
        """Log in to the configured token; records in ``namespace(meta_namespace(token))``
        (``namespace`` is the KBS storage provider's look-up)."""
        token = Pkcs11Token(config)
        return cls(token, meta=namespace(meta_namespace(token)), max_versions=max_versions)

    @property
    def kind(self) -> str:
        return "pkcs11"

    def close(self) -> None:
        self.token.close()
