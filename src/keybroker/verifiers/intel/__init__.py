"""Intel TDX and SGX: DCAP quotes, PCK chains, collateral and TCB appraisal, claims."""
