"""DCAP quote verification cost, with and without collateral.

.venv/bin/python bench/dcap_verify.py [ROUNDS]

1. Quote only, for each recorded quote in tests/vectors/verifier: parse, PCK chain to the
   pinned Intel root, QE report, quote signature.
2. Full verification with cached collateral, for TDX quote 6 (the quote whose FMSPC the
   recorded TCB Info is for): the quote as in 1, then the collateral read from an on-disk
   ``CachingFetcher`` (a cache hit, as in production between two ``nextUpdate``s) and
   verified: TCB Info and QE Identity signatures and chains, three CRLs, the PCK's revocation
   status, dates, and TCB level selection.

The recorded vectors carry no TCB signing chain and no CRLs, so the collateral in 2 is the
recorded TCB Info and QE Identity re-signed by the test PKI that stands in for Intel
(tests/standins/intel_pki.py), and the PCK chain it appraises is that PKI's. The work per
verification is the same as with Intel's own collateral: the same documents, key sizes and
number of signature checks.
"""

from __future__ import annotations

import datetime
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from keybroker.verifiers.intel.dcap import parse_quote, verify_quote  # noqa: E402
from keybroker.verifiers.intel.dcap_collateral import (  # noqa: E402
    Collateral,
    CollateralRequest,
    collateral_request,
    signed_member,
    verify_collateral,
)
from keybroker.verifiers.intel.dcap_fetcher import CachingFetcher, CollateralFetcher  # noqa: E402
from standins.intel_pki import IntelPki  # noqa: E402

VECTORS = ROOT / "tests" / "vectors" / "verifier"
UTC = datetime.UTC
NOW = {
    "tdx_quote_4.dat": datetime.datetime(2025, 1, 1, tzinfo=UTC),
    "tdx_quote_5.dat": datetime.datetime(2025, 1, 1, tzinfo=UTC),
    "tdx_quote_6.dat": datetime.datetime(2026, 1, 1, tzinfo=UTC),
    "occlum_quote.dat": datetime.datetime(2025, 1, 1, tzinfo=UTC),
}
COLLATERAL_NOW = datetime.datetime(2025, 11, 1, tzinfo=UTC)  # inside the recorded TCB Info


class _Issued(CollateralFetcher):
    """The origin behind the cache: hands out one prepared collateral set."""

    def __init__(self, collateral: Collateral) -> None:
        self._collateral = collateral
        self.calls = 0

    def _fetch(self, request: CollateralRequest) -> Collateral:
        self.calls += 1
        return self._collateral


def _rate(label: str, rounds: int, work: Callable[[], object]) -> None:
    start = time.perf_counter()
    for _ in range(rounds):
        work()
    elapsed = time.perf_counter() - start
    print(f"{label:34} {rounds / elapsed:8.0f} verifications/s  {elapsed / rounds * 1e3:.2f} ms")


def _quote_only(raw: bytes, now: datetime.datetime) -> None:
    verify_quote(parse_quote(raw), now)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    print("quote only (parse, PCK chain, QE report, quote signature)")
    for name, now in NOW.items():
        raw = (VECTORS / name).read_bytes()
        _rate(f"  {name}", rounds, functools.partial(_quote_only, raw, now))

    raw = (VECTORS / "tdx_quote_6.dat").read_bytes()
    pki = IntelPki()
    recorded = parse_quote(raw)
    appraised = pki.quote(recorded, pki.pck(recorded.pck_chain[0]))
    tcb_body, _ = signed_member((VECTORS / "tcbInfo.json").read_bytes(), "tcbInfo")
    qe_body, _ = signed_member((VECTORS / "enclaveIdentity.json").read_bytes(), "enclaveIdentity")
    origin = _Issued(
        pki.collateral(tcb_info_body=tcb_body, qe_identity_body=qe_body, now=COLLATERAL_NOW)
    )
    with tempfile.TemporaryDirectory() as cache:
        fetcher = CachingFetcher(origin, Path(cache), clock=lambda: COLLATERAL_NOW)
        request = collateral_request(appraised, appraised.pck_chain[0])

        def full() -> None:
            verify_quote(parse_quote(raw), NOW["tdx_quote_6.dat"])
            verify_collateral(appraised, fetcher.fetch(request), COLLATERAL_NOW, root=pki.root.cert)

        full()  # fills the cache
        print("full, with cached collateral (quote + TCB Info + QE Identity + CRLs + TCB level)")
        _rate("  tdx_quote_6.dat", rounds, full)
        assert origin.calls == 1, "every round after the first must be a cache hit"


if __name__ == "__main__":
    main()
