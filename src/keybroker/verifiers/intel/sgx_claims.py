"""SGX claims from a parsed DCAP quote, in upstream Trustee's names and layout.

Upstream reports the quote header and the enclave's report body as hex strings of their raw
(little-endian) bytes under ``header`` / ``body`` (the report's ``attributes`` split into
``attributes.flags`` and ``attributes.xfrm``), and the PCK certificate's platform facts:
``platform_provider_id`` (the PPID), ``sgx_type`` and the configuration flags. Collateral
results (``tcb_status``, ``advisory_ids``, dates) are added by the collateral layer.
"""

from __future__ import annotations

from cryptography import x509

from keybroker.protocol.models import JsonValue
from keybroker.verifiers.intel.dcap import Quote, SgxReportBody
from keybroker.verifiers.intel.sgx_extensions import sgx_extension

SGX_TYPES = {0: "Standard", 1: "Scalable", 2: "ScalableWithIntegrity"}


def sgx_claims(quote: Quote, pck: x509.Certificate) -> dict[str, JsonValue]:
    body = quote.body
    if not isinstance(body, SgxReportBody):
        raise TypeError("sgx_claims needs an SGX quote")
    raw = quote.header.raw
    extension = sgx_extension(pck)
    claims: dict[str, JsonValue] = {
        "header": {
            "version": raw[0:2].hex(),
            "att_key_type": raw[2:4].hex(),
            "att_key_data_0": raw[4:8].hex(),
            "qe_svn": raw[8:10].hex(),
            "pce_svn": raw[10:12].hex(),
            "vendor_id": quote.header.vendor_id.hex(),
            "user_data": quote.header.user_data.hex(),
        },
        "body": {
            "cpu_svn": body.cpu_svn.hex(),
            "misc_select": body.misc_select.hex(),
            "reserved1": body.reserved1.hex(),
            "isv_ext_prod_id": body.isv_ext_prod_id.hex(),
            "attributes.flags": body.attributes[:8].hex(),
            "attributes.xfrm": body.attributes[8:].hex(),
            "mr_enclave": body.mr_enclave.hex(),
            "reserved2": body.reserved2.hex(),
            "mr_signer": body.mr_signer.hex(),
            "reserved3": body.reserved3.hex(),
            "config_id": body.config_id.hex(),
            "isv_prod_id": body.isv_prod_id.hex(),
            "isv_svn": body.isv_svn.hex(),
            "config_svn": body.config_svn.hex(),
            "reserved4": body.reserved4.hex(),
            "isv_family_id": body.isv_family_id.hex(),
            "report_data": body.report_data.hex(),
        },
    }
    ppid = extension.get("ppid")
    if isinstance(ppid, bytes):
        claims["platform_provider_id"] = ppid.hex()
    sgx_type = extension.get("sgx_type")
    if isinstance(sgx_type, int) and not isinstance(sgx_type, bool):
        claims["sgx_type"] = SGX_TYPES.get(sgx_type, str(sgx_type))
    for flag, name in (
        ("dynamic_platform", "is_dynamic_platform"),
        ("cached_keys", "is_cached_keys"),
        ("smt_enabled", "is_smt_enabled"),
    ):
        if isinstance(extension.get(flag), bool):
            claims[name] = extension[flag]
    return claims
