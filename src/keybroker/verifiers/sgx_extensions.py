"""The Intel SGX extension of a PCK certificate (OID 1.2.840.113741.1.13.1): FMSPC, PCE-ID,
TCB components, PPID, platform instance id and the rest, as a flat ``{name: value}`` map.

The extension is a DER SEQUENCE of ``SEQUENCE { OID, value }`` entries, some of whose values are
again such sequences (TCB, Configuration). This module reads exactly that shape and nothing
else: a value that is not an OCTET STRING, INTEGER, ENUMERATED, BOOLEAN or such a nested
sequence is refused. Only call it on a certificate whose chain has been verified.
"""

from __future__ import annotations

from cryptography import x509

from keybroker.errors import EvidenceError

SGX_EXTENSION = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_NAMES = {
    "1.2.840.113741.1.13.1.1": "ppid",
    "1.2.840.113741.1.13.1.2": "tcb",
    "1.2.840.113741.1.13.1.2.17": "pcesvn",
    "1.2.840.113741.1.13.1.2.18": "cpusvn",
    "1.2.840.113741.1.13.1.3": "pceid",
    "1.2.840.113741.1.13.1.4": "fmspc",
    "1.2.840.113741.1.13.1.5": "sgx_type",
    "1.2.840.113741.1.13.1.6": "platform_instance_id",
    "1.2.840.113741.1.13.1.7": "configuration",
    "1.2.840.113741.1.13.1.7.1": "dynamic_platform",
    "1.2.840.113741.1.13.1.7.2": "cached_keys",
    "1.2.840.113741.1.13.1.7.3": "smt_enabled",
}
_SEQUENCE, _OID, _OCTETS, _INTEGER, _ENUMERATED, _BOOLEAN = 0x30, 0x06, 0x04, 0x02, 0x0A, 0x01
Value = bytes | int | bool


def _tlv(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """(tag, content, next offset) of the DER element at ``offset``."""
    if offset + 2 > len(data):
        raise EvidenceError("the PCK certificate's SGX extension is truncated")
    tag, length, offset = data[offset], data[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or offset + count > len(data):
            raise EvidenceError("the PCK certificate's SGX extension has a bad length")
        length, offset = int.from_bytes(data[offset : offset + count], "big"), offset + count
    if offset + length > len(data):
        raise EvidenceError("the PCK certificate's SGX extension is truncated")
    return tag, data[offset : offset + length], offset + length


def _oid(content: bytes) -> str:
    first, parts, value = content[0], [], 0
    parts += [str(first // 40), str(first % 40)]
    for byte in content[1:]:
        value = value << 7 | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(str(value))
            value = 0
    return ".".join(parts)


def _entries(sequence: bytes, out: dict[str, Value]) -> None:
    offset = 0
    while offset < len(sequence):
        tag, entry, offset = _tlv(sequence, offset)
        if tag != _SEQUENCE:
            raise EvidenceError("an SGX extension entry is not a SEQUENCE")
        oid_tag, oid, rest = _tlv(entry, 0)
        value_tag, value, end = _tlv(entry, rest)
        if oid_tag != _OID or end != len(entry):
            raise EvidenceError("an SGX extension entry is not { OID, value }")
        dotted = _oid(oid)
        name = _NAMES.get(dotted)
        if name is None:  # e.g. the 16 TCB component SVNs: keep them by their arc
            name = (
                "tcb_comp" + dotted.rsplit(".", 1)[1]
                if dotted.startswith("1.2.840.113741.1.13.1.2.")
                else dotted
            )
        if value_tag == _SEQUENCE:
            _entries(value, out)
        elif value_tag == _OCTETS:
            out[name] = value
        elif value_tag in (_INTEGER, _ENUMERATED):
            out[name] = int.from_bytes(value, "big", signed=value_tag == _INTEGER)
        elif value_tag == _BOOLEAN:
            out[name] = value != b"\x00"
        else:
            raise EvidenceError(f"SGX extension {dotted} has an unexpected value type {value_tag}")


def sgx_extension(certificate: x509.Certificate) -> dict[str, Value]:
    try:
        raw = certificate.extensions.get_extension_for_oid(SGX_EXTENSION).value
    except x509.ExtensionNotFound:
        raise EvidenceError("the PCK certificate has no SGX extension") from None
    if not isinstance(raw, x509.UnrecognizedExtension):
        raise EvidenceError("the PCK certificate's SGX extension is not raw DER")
    tag, content, end = _tlv(raw.value, 0)
    if tag != _SEQUENCE or end != len(raw.value):
        raise EvidenceError("the PCK certificate's SGX extension is not a SEQUENCE")
    out: dict[str, Value] = {}
    _entries(content, out)
    return out
