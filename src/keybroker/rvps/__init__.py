"""Reference Value Provider Service: verified reference values the attestation policies query."""
