"""TCG DICE certificate extensions: the firmware digests (FWIDs) of a ``DiceTcbInfo``.

``DiceTcbInfo`` (OID 2.23.133.5.4.1, TCG DICE Attestation Architecture)::

    DiceTcbInfo ::= SEQUENCE {
        vendor [0] IMPLICIT UTF8String OPTIONAL, model [1] ..., version [2] ...,
        svn [3] IMPLICIT INTEGER OPTIONAL, layer [4] ..., index [5] ...,
        fwids [6] IMPLICIT SEQUENCE OF FWID OPTIONAL, ... }
    FWID ::= SEQUENCE { hashAlg OBJECT IDENTIFIER, digest OCTET STRING }

Read with the one DER reader (:mod:`keybroker.verifiers.der`). Upstream Trustee's DPU
verifier looks for one more SEQUENCE inside ``[6]`` (``[6] { SEQUENCE { FWID, … } }``); both
that form and the specification's (``[6] { FWID, … }``) are read here, and anything else is
refused rather than read as "no firmware".
"""

from __future__ import annotations

from dataclasses import dataclass

from keybroker.errors import EvidenceError
from keybroker.verifiers.der import OCTET_STRING, OID, SEQUENCE, object_identifier, read_tlv
from keybroker.verifiers.der import single as der_single

TCB_INFO_OID = "2.23.133.5.4.1"
_FWIDS = 0xA6  # [6] constructed
MAX_FWIDS = 32


@dataclass(frozen=True)
class Fwid:
    hash_algorithm: str  # dotted OID
    digest: bytes


def _elements(content: bytes, what: str) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(content):
        tag, value, offset = read_tlv(content, offset, what)
        out.append((tag, value))
        if len(out) > 64:
            raise EvidenceError(f"{what} has too many elements")
    return out


def _fwid(tag: int, content: bytes, what: str) -> Fwid:
    parts = _elements(content, what) if tag == SEQUENCE else []
    if len(parts) != 2 or parts[0][0] != OID or parts[1][0] != OCTET_STRING:
        raise EvidenceError(f"{what} has an FWID that is not {{hashAlg, digest}}")
    return Fwid(object_identifier(parts[0][1], what), parts[1][1])


def tcb_info_fwids(extension_value: bytes, what: str = "the DICE TcbInfo") -> list[Fwid]:
    """The FWIDs of a ``DiceTcbInfo`` extension value, in order (none when it has no
    ``fwids`` field)."""
    fields = _elements(der_single(extension_value, SEQUENCE, what), what)
    for tag, content in fields:
        if tag != _FWIDS:
            continue
        items = _elements(content, what)
        if len(items) == 1 and items[0][0] == SEQUENCE:
            inner = _elements(items[0][1], what)
            if inner and all(t == SEQUENCE for t, _ in inner):
                items = inner  # upstream's wrapped form
        if len(items) > MAX_FWIDS:
            raise EvidenceError(f"{what} has more than {MAX_FWIDS} FWIDs")
        return [_fwid(t, c, what) for t, c in items]
    return []
