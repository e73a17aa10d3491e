"""Admin access to the KBS's administrative endpoints (upstream ``[admin]``).

- ``DenyAll``: every admin request is refused.
- ``InsecureAllowAll``: every admin request is admitted, with a warning at start-up and on
  every use.
- ``AuthenticatedAuthorization``: a bearer JWT from a trusted identity provider, then a role
  ACL over the request path (:mod:`keybroker.kbs.admin_auth`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from keybroker.config import AdminAuthenticated, AdminConfig, AdminDenyAll, AdminInsecureAllowAll
from keybroker.errors import AdminDeniedError
from keybroker.kbs.admin_auth import (
    AdminIdentity,
    BearerJwtAuthenticator,
    Fetch,
    IdentityProviderKeys,
    RegexAcl,
    https_fetch,
)

log = logging.getLogger(__name__)

INSECURE_IDENTITY = AdminIdentity(role="InsecureAllowAll", issuer=None, subject=None)


class AdminGuard:
    def __init__(
        self,
        config: AdminConfig,
        *,
        fetch: Fetch = https_fetch,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._authenticator: BearerJwtAuthenticator | None = None
        self._acl: RegexAcl | None = None
        self._allow_all = isinstance(config, AdminInsecureAllowAll)
        if self._allow_all:
            log.warning(
                "admin authorization_mode = InsecureAllowAll: ANYONE who can reach this KBS "
                "can change resources and policies; never use it outside a test setup"
            )
        elif isinstance(config, AdminAuthenticated):
            providers = [
                IdentityProviderKeys(idp, fetch=fetch, clock=clock)
                for idp in config.authentication.bearer_jwt.identity_providers
            ]
            self._authenticator = BearerJwtAuthenticator(providers, clock=clock)
            self._acl = RegexAcl(config.authorization.regex_acl.acls)
        else:
            assert isinstance(config, AdminDenyAll)  # noqa: S101 - the union is exhausted

    async def check(self, uri: str, authorization: str | None) -> AdminIdentity:
        """Admit the admin request for ``uri`` (path and query) or raise."""
        if self._allow_all:
            log.warning("admin request to %s admitted by InsecureAllowAll", uri[:200])
            return INSECURE_IDENTITY
        if self._authenticator is None or self._acl is None:
            raise AdminDeniedError(
                f"admin access denied for {uri[:200]}: the admin API is disabled "
                "(authorization_mode = DenyAll)"
            )
        identity = await self._authenticator.authenticate(authorization)
        self._acl.authorize(identity, uri)
        return identity
