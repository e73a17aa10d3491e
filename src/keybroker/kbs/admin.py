"""Admin access to the KBS's administrative endpoints.

Modes (upstream ``[admin] authorization_mode``): ``DenyAll`` refuses every admin request;
``InsecureAllowAll`` admits every one and says so in the log each time. Bearer-JWT identity
providers with role ACLs (``AuthenticatedAuthorization``) arrive with the admin security issue.
"""

from __future__ import annotations

import logging

from keybroker.config import AdminConfig, AdminDenyAll, AdminInsecureAllowAll
from keybroker.errors import AdminDeniedError, UnsupportedFeatureError

log = logging.getLogger(__name__)


class AdminGuard:
    def __init__(self, config: AdminConfig) -> None:
        if isinstance(config, AdminInsecureAllowAll):
            log.warning(
                "admin authorization_mode = InsecureAllowAll: ANYONE who can reach this KBS "
                "can change resources and policies; never use it outside a test setup"
            )
            self._allow = True
        elif isinstance(config, AdminDenyAll):
            self._allow = False
        else:
            raise UnsupportedFeatureError(
                "[admin] authorization_mode = AuthenticatedAuthorization",
                "use DenyAll or InsecureAllowAll for now",
            )

    def check(self, endpoint: str) -> None:
        """Admit the admin request for ``endpoint`` or raise."""
        if not self._allow:
            raise AdminDeniedError(
                f"admin access denied for {endpoint}: the admin API is disabled "
                "(authorization_mode = DenyAll)"
            )
        log.warning("admin request to %s admitted by InsecureAllowAll", endpoint)
