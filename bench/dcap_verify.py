"""DCAP quote verification cost: parse, PCK chain to the pinned root, QE report, quote signature.

.venv/bin/python bench/dcap_verify.py [ROUNDS]

Prints verifications per second for each recorded quote in ../shared/vectors/verifier. The
collateral appraisal (TCB Info, QE Identity, CRLs) is not included yet: it arrives with the
collateral layer, and with cached collateral it adds signature checks of its own.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

from keybroker.verifiers.dcap import parse_quote, verify_quote

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "verifier"
NOW = {
    "tdx_quote_4.dat": datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
    "tdx_quote_5.dat": datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
    "tdx_quote_6.dat": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
    "occlum_quote.dat": datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    for name, now in NOW.items():
        raw = (VECTORS / name).read_bytes()
        start = time.perf_counter()
        for _ in range(rounds):
            verify_quote(parse_quote(raw), now)
        elapsed = time.perf_counter() - start
        print(f"{name:18} {rounds / elapsed:8.0f} verifications/s  {elapsed / rounds * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
