"""Reference Value Provider Service (arrives with the Attestation Service semantics issue)."""
