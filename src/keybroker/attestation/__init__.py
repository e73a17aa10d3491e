"""The Attestation Service: evidence -> verifier claims -> trust vector -> signed EAR token."""
