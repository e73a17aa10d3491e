"""Guest-side evidence for tests of services that appraise quotes remotely (the ITA stand-in).

``RecordedQuoteAttester`` implements the SDK's ``Attester`` with an upstream recorded quote
(``tests/vectors/verifier``) whose report data is replaced by the digest the KBS asks for. The
quote's signature then no longer verifies: use it only against a service that does not check
signatures, as the ITA stand-in says it does not. The evidence has the guest's shape
(``{"quote": <base64>}``, upstream's TDX and SGX attesters).
"""

from __future__ import annotations

import base64

from conftest import vector
from keybroker.client.attesters import Attester
from keybroker.protocol.models import JsonValue, Tee
from keybroker.verifiers.intel.dcap import HEADER_SIZE

# (recorded quote, offset of REPORTDATA in its body): TD 1.0 report body, SGX report body
_QUOTES = {Tee.TDX: ("tdx_quote_4.dat", 520), Tee.SGX: ("occlum_quote.dat", 320)}
REPORT_DATA_SIZE = 64


class RecordedQuoteAttester(Attester):
    def __init__(self, tee: Tee, *, extra: dict[str, JsonValue] | None = None) -> None:
        """``extra``: more evidence members (``cc_eventlog``, ``user_data``)."""
        name, offset = _QUOTES[tee]
        self.tee = tee
        self._quote = vector("verifier", name).read_bytes()
        self._offset = HEADER_SIZE + offset
        self._extra = extra or {}

    def evidence(self, report_data: bytes) -> JsonValue:
        padded = report_data.ljust(REPORT_DATA_SIZE, b"\0")
        quote = bytearray(self._quote)
        quote[self._offset : self._offset + REPORT_DATA_SIZE] = padded
        return {"quote": base64.b64encode(bytes(quote)).decode(), **self._extra}
