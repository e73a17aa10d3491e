"""TPM 2.0: quote structures and their signature checks."""
