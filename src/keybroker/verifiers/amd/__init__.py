"""AMD SEV-SNP: attestation reports, VCEK/VLEK chains to the pinned ARK, KDS collateral."""
