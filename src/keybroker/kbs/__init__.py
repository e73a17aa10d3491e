"""The KBS HTTP application: RCAR sessions, admin access, resource policy, plugin dispatch."""
