"""Rego policy engine over ``regopy``: load, compile once, evaluate. Knows nothing of KBS or AS."""
