"""TCG formats shared by TEEs: the crypto-agile event log (CCEL, TPM) and its event details."""
