"""The Intel SGX extension of a PCK certificate (OID 1.2.840.113741.1.13.1): FMSPC, PCE-ID,
TCB components, PPID, platform instance id and the rest, as a flat ``{name: value}`` map.

The extension is a DER SEQUENCE of ``SEQUENCE { OID, value }`` entries, some of whose values are
again such sequences (TCB, Configuration). This module reads exactly that shape and nothing
else: a value that is not an OCTET STRING, INTEGER, ENUMERATED, BOOLEAN or such a nested
sequence is refused; elements are read by the strict DER reader of ``der``. Only call it on a
certificate whose chain has been verified.
"""

from __future__ import annotations

from cryptography import x509

from keybroker.errors import EvidenceError
from keybroker.verifiers import der

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
Value = bytes | int | bool
_WHAT = "the PCK certificate's SGX extension"


def _entries(sequence: bytes, out: dict[str, Value]) -> None:
    offset = 0
    while offset < len(sequence):
        tag, entry, offset = der.read_tlv(sequence, offset, _WHAT)
        if tag != der.SEQUENCE:
            raise EvidenceError("an SGX extension entry is not a SEQUENCE")
        oid_tag, oid, rest = der.read_tlv(entry, 0, _WHAT)
        value_tag, value, end = der.read_tlv(entry, rest, _WHAT)
        if oid_tag != der.OID or end != len(entry):
            raise EvidenceError("an SGX extension entry is not { OID, value }")
        dotted = der.object_identifier(oid, _WHAT)
        name = _NAMES.get(dotted)
        if name is None:  # e.g. the 16 TCB component SVNs: keep them by their arc
            name = (
                "tcb_comp" + dotted.rsplit(".", 1)[1]
                if dotted.startswith("1.2.840.113741.1.13.1.2.")
                else dotted
            )
        if value_tag == der.SEQUENCE:
            _entries(value, out)
        elif value_tag == der.OCTET_STRING:
            out[name] = value
        elif value_tag in (der.INTEGER, der.ENUMERATED):
            out[name] = int.from_bytes(value, "big", signed=value_tag == der.INTEGER)
        elif value_tag == der.BOOLEAN:
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
    tag, content, end = der.read_tlv(raw.value, 0, _WHAT)
    if tag != der.SEQUENCE or end != len(raw.value):
        raise EvidenceError("the PCK certificate's SGX extension is not a SEQUENCE")
    out: dict[str, Value] = {}
    _entries(content, out)
    return out
