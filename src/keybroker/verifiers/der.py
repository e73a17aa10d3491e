"""A strict reader of DER type-length-value elements, for the vendor X.509 extensions that
``cryptography`` hands over as raw bytes (Intel's SGX extension, AMD's VCEK extensions).

Strict: a one-byte tag (the high-tag-number form is refused), a definite length in its
shortest form (long form only from 128 on, no leading zero octet, at most
:data:`MAX_LENGTH_OCTETS` octets), and content that fits in the data. It reads elements; what
they mean is the caller's business. Errors are :class:`EvidenceError` naming ``what``.
"""

from __future__ import annotations

from keybroker.errors import EvidenceError

MAX_LENGTH_OCTETS = 3  # contents up to 16 MiB: far beyond any certificate extension

SEQUENCE, OID, OCTET_STRING, INTEGER, ENUMERATED, BOOLEAN = 0x30, 0x06, 0x04, 0x02, 0x0A, 0x01


def read_tlv(data: bytes, offset: int, what: str) -> tuple[int, bytes, int]:
    """(tag, content, offset after the element) of the DER element at ``offset``."""
    if offset + 2 > len(data):
        raise EvidenceError(f"{what} is truncated")
    tag, length, offset = data[offset], data[offset + 1], offset + 2
    if tag & 0x1F == 0x1F:
        raise EvidenceError(f"{what} uses a multi-byte DER tag")
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > MAX_LENGTH_OCTETS or offset + count > len(data):
            raise EvidenceError(f"{what} has a bad DER length")
        length_octets = data[offset : offset + count]
        length, offset = int.from_bytes(length_octets, "big"), offset + count
        if length_octets[0] == 0 or length < 0x80:
            raise EvidenceError(f"{what} has a DER length that is not in its shortest form")
    if offset + length > len(data):
        raise EvidenceError(f"{what} is truncated")
    return tag, data[offset : offset + length], offset + length


def single(data: bytes, tag: int, what: str) -> bytes:
    """The content of the one DER element of type ``tag`` that makes up all of ``data``."""
    found, content, end = read_tlv(data, 0, what)
    if found != tag:
        raise EvidenceError(f"{what} is not DER of tag 0x{tag:02x}")
    if end != len(data):
        raise EvidenceError(f"{what} has a DER length that does not match its size")
    return content


def object_identifier(content: bytes, what: str) -> str:
    """The dotted form of an OBJECT IDENTIFIER's content: base-128 sub-identifiers in their
    shortest form, the last one complete."""
    if not content or content[-1] & 0x80:
        raise EvidenceError(f"{what} holds a malformed OBJECT IDENTIFIER")
    arcs: list[int] = []
    value, starting = 0, True
    for byte in content:
        if starting and byte == 0x80:
            raise EvidenceError(f"{what} holds an OBJECT IDENTIFIER not in its shortest form")
        value, starting = value << 7 | (byte & 0x7F), not byte & 0x80
        if starting:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])
