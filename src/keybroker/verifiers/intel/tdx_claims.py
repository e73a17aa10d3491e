"""TDX claims from a parsed DCAP quote, in upstream Trustee's names and layout.

Upstream's TDX verifier reports the quote header and TD report as hex strings of their raw
(little-endian) bytes under ``quote.header`` / ``quote.body``, plus ``report_data``,
``init_data`` (= ``mr_config_id``), the decoded ``td_attributes`` flags and the PCK
certificate's ``platform_instance_id``. Byte order follows upstream exactly, including the
platform instance id, which upstream prints with its 16 bytes reversed.
"""

from __future__ import annotations

from cryptography import x509

from keybroker.protocol.models import JsonValue
from keybroker.verifiers.intel.dcap import Quote, TdReportBody
from keybroker.verifiers.intel.sgx_extensions import sgx_extension

# TDATTRIBUTES bits (Intel TDX module ABI): which the default policy and operators look at
_TD_ATTRIBUTE_BITS = {
    "debug": 0,
    "septve_disable": 28,
    "protection_keys": 30,
    "key_locker": 31,
    "perfmon": 63,
}


def td_attribute_flags(td_attributes: bytes) -> dict[str, JsonValue]:
    value = int.from_bytes(td_attributes, "little")
    return {name: bool(value >> bit & 1) for name, bit in sorted(_TD_ATTRIBUTE_BITS.items())}


def tdx_claims(quote: Quote, pck: x509.Certificate) -> dict[str, JsonValue]:
    body = quote.body
    if not isinstance(body, TdReportBody):
        raise TypeError("tdx_claims needs a TDX quote")
    header = quote.header
    fields: dict[str, JsonValue] = {
        "mr_config_id": body.mr_config_id.hex(),
        "mr_owner": body.mr_owner.hex(),
        "mr_owner_config": body.mr_owner_config.hex(),
        "mr_seam": body.mr_seam.hex(),
        "mr_td": body.mr_td.hex(),
        "mrsigner_seam": body.mrsigner_seam.hex(),
        "report_data": body.report_data.hex(),
        **{f"rtmr_{index}": rtmr.hex() for index, rtmr in enumerate(body.rtmrs)},
        "seam_attributes": body.seam_attributes.hex(),
        "tcb_svn": body.tcb_svn.hex(),
        "td_attributes": body.td_attributes.hex(),
        "xfam": body.xfam.hex(),
    }
    if body.tee_tcb_svn2 is not None and body.mr_servicetd is not None:  # TDX 1.5
        fields["tee_tcb_svn2"] = body.tee_tcb_svn2.hex()
        fields["mr_servicetd"] = body.mr_servicetd.hex()
    instance = sgx_extension(pck).get("platform_instance_id")
    claims: dict[str, JsonValue] = {
        "quote": {
            "header": {
                "version": header.raw[0:2].hex(),
                "att_key_type": header.raw[2:4].hex(),
                "tee_type": header.raw[4:8].hex(),
                "reserved": header.reserved.hex(),
                "vendor_id": header.vendor_id.hex(),
                "user_data": header.user_data.hex(),
            },
            "body": fields,
        },
        "report_data": body.report_data.hex(),
        "init_data": body.mr_config_id.hex(),
        "td_attributes": td_attribute_flags(body.td_attributes),
    }
    if isinstance(instance, bytes):
        claims["platform_instance_id"] = instance[::-1].hex()
    return claims
