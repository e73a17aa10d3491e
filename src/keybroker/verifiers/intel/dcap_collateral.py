"""DCAP collateral: verify Intel's TCB Info, QE Identity and CRLs for a quote, and grade the
platform's TCB with them.

Pure: a parsed quote, the collateral's bytes and the time in; a :class:`CollateralVerdict` out.
No I/O and no clock of its own; collateral reaches the verifier through a
:mod:`~keybroker.verifiers.intel.dcap_fetcher`. :func:`verify_collateral` proves, failing closed
with :class:`EvidenceError` at each step:

1. the quote's PCK chain verifies to the Intel SGX Root CA **pinned in this package** (or the
   ``root`` passed in, for tests); the Root CA CRL is signed by that root; the PCK CRL is
   issued and signed by the CA that issued the PCK certificate, and its issuer chain verifies
   to the root;
2. neither that CA (Root CA CRL) nor the PCK certificate (PCK CRL) is revoked;
3. TCB Info and QE Identity are each signed over the **exact bytes** of their ``tcbInfo`` /
   ``enclaveIdentity`` member as served, by an "Intel SGX TCB Signing" certificate issued by the
   root and not revoked; those same bytes are then parsed, so nothing unsigned is evaluated;
4. nothing has expired: certificates at ``now``, and TCB Info, QE Identity and both CRLs by
   their ``nextUpdate`` (unless ``insecure_accept_expired_collateral``, which then reports
   ``collateral_expiration_status`` "1" as upstream does);
5. :func:`~keybroker.verifiers.intel.dcap_tcb.evaluate_tcb` grades the TCB; ``Revoked`` is refused.

It does not check the quote's own signatures (:func:`~keybroker.verifiers.intel.dcap.verify_quote`
does) nor decide whether a status is acceptable (the appraisal policy does).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.intel.dcap import (
    TEE_TDX,
    Quote,
    intel_root,
    verify_chain,
    verify_p256,
)
from keybroker.verifiers.intel.dcap_tcb import PlatformTcb, TcbEvaluation, evaluate_tcb
from keybroker.verifiers.intel.dcap_tcb_info import (
    QeIdentity,
    TcbInfo,
    TcbStatus,
    load_json_object,
    parse_qe_identity,
    parse_tcb_info,
)
from keybroker.verifiers.intel.sgx_extensions import sgx_extension

logger = logging.getLogger(__name__)

MAX_ITEM_BYTES = 1024 * 1024  # real TCB Info is ~10 KiB, a PCK CRL ~100 KiB
_JSON_SPACE = " \t\n\r"
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)
Tee = Literal["sgx", "tdx"]
PckCa = Literal["platform", "processor"]


@dataclass(frozen=True)
class CollateralRequest:
    """Which collateral a quote needs: what a fetcher is asked for."""

    tee: Tee
    fmspc: bytes
    pck_ca: PckCa

    def __post_init__(self) -> None:
        if self.tee not in ("sgx", "tdx") or self.pck_ca not in ("platform", "processor"):
            raise EvidenceError(f"no collateral for TEE {self.tee!r} and CA {self.pck_ca!r}")
        if len(self.fmspc) != 6:
            raise EvidenceError(f"an FMSPC is 6 bytes, found {len(self.fmspc)}")


def collateral_request(quote: Quote, pck: x509.Certificate) -> CollateralRequest:
    """The collateral for a quote whose PCK certificate ``pck`` was verified."""
    fmspc = sgx_extension(pck).get("fmspc")
    if not isinstance(fmspc, bytes):
        raise EvidenceError("the PCK certificate carries no FMSPC")
    issuer = " ".join(str(a.value) for a in pck.issuer.get_attributes_for_oid(NameOID.COMMON_NAME))
    pck_ca: PckCa
    if issuer.endswith("PCK Platform CA"):
        pck_ca = "platform"
    elif issuer.endswith("PCK Processor CA"):
        pck_ca = "processor"
    else:
        raise EvidenceError(f"the PCK certificate's issuer {issuer!r} is no Intel PCK CA")
    return CollateralRequest("tdx" if quote.header.tee_type == TEE_TDX else "sgx", fmspc, pck_ca)


@dataclass(frozen=True)
class Collateral:
    """The collateral of one quote, as served by Intel PCS or a PCCS; nothing in it is trusted.

    ``tcb_info`` and ``qe_identity`` are the JSON documents (``{"tcbInfo": {...}, "signature":
    "..."}``), the chains PEM (signer first), the CRLs DER or PEM."""

    tcb_info: bytes
    tcb_info_issuer_chain: bytes
    qe_identity: bytes
    qe_identity_issuer_chain: bytes
    pck_crl: bytes
    pck_crl_issuer_chain: bytes
    root_ca_crl: bytes

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, bytes) or not 0 < len(value) <= MAX_ITEM_BYTES:
                raise EvidenceError(f"collateral {name} is empty or over {MAX_ITEM_BYTES} bytes")


@dataclass(frozen=True)
class CollateralVerdict:
    """What verified collateral says about a quote's platform; ``claims()`` in upstream's
    words. The QE's and TDX module's own levels (and advisories) are in ``evaluation``."""

    tcb_status: TcbStatus
    advisory_ids: tuple[str, ...]  # the matched TCB Info level's, as upstream reports them
    tcb_date: datetime.datetime
    collateral_expired: bool
    earliest_issue_date: datetime.datetime
    latest_issue_date: datetime.datetime
    earliest_expiration_date: datetime.datetime
    tcb_eval_num: int
    pck_crl_num: int
    root_ca_crl_num: int
    root_key_id: bytes  # SHA-384 of the root's public key (uncompressed point)
    evaluation: TcbEvaluation
    tcb_info: TcbInfo
    qe_identity: QeIdentity

    def claims(self) -> dict[str, JsonValue]:
        """Upstream's collateral claims (names and formats of its ``sgx`` / ``tdx`` claims)."""
        return {
            "tcb_status": self.tcb_status.value,
            "advisory_ids": list(self.advisory_ids),
            "tcb_date": _rfc3339(self.tcb_date),
            "collateral_expiration_status": "1" if self.collateral_expired else "0",
            "earliest_issue_date": _rfc3339(self.earliest_issue_date),
            "latest_issue_date": _rfc3339(self.latest_issue_date),
            "earliest_expiration_date": _rfc3339(self.earliest_expiration_date),
            "tcb_eval_num": self.tcb_eval_num,
            "pck_crl_num": self.pck_crl_num,
            "root_ca_crl_num": self.root_ca_crl_num,
            "root_key_id": self.root_key_id.hex(),
        }


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def signed_member(unverified_document: bytes, member: str) -> tuple[bytes, bytes]:
    """(the exact bytes of ``member``'s value, the 64-byte signature) of a document shaped
    ``{member: {...}, "signature": "<hex>"}``. Intel signs the member's bytes as it serves them,
    so they are cut out of the document, never re-serialized."""
    document = load_json_object(unverified_document, member)
    if set(document) != {member, "signature"}:
        raise EvidenceError(f"the {member} document has keys {sorted(document)}")
    signature = document["signature"]
    if not (isinstance(signature, str) and re.fullmatch(r"[0-9a-fA-F]{128}", signature)):
        raise EvidenceError(f"the {member} signature is not 64 bytes of hex")
    text = unverified_document.decode("utf-8")  # valid: load_json_object decoded it
    start, end = _member_span(text, member)
    return text[start:end].encode("utf-8"), bytes.fromhex(signature)


def _member_span(text: str, member: str) -> tuple[int, int]:
    """Where ``member``'s value starts and ends in a top-level JSON object already validated."""
    decoder = json.JSONDecoder()

    def skip(index: int) -> int:
        while index < len(text) and text[index] in _JSON_SPACE:
            index += 1
        return index

    index = skip(0) + 1  # past "{"
    while True:
        key, index = decoder.raw_decode(text, skip(index))
        value_start = skip(skip(index) + 1)  # past ":"
        _, value_end = decoder.raw_decode(text, value_start)
        if key == member:
            return value_start, value_end
        index = skip(value_end) + 1  # past ","


def _verify_p256(cert: x509.Certificate, signature: bytes, message: bytes, what: str) -> None:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise EvidenceError(f"the certificate that signs {what} has no EC key")
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    if not _document_signed(point, signature, message):
        raise EvidenceError(f"the {what} signature does not verify")


@lru_cache(maxsize=256)
def _document_signed(point: bytes, signature: bytes, message: bytes) -> bool:
    """Whether the P-256 key ``point`` signed ``message``: a pure function of the bytes, so
    remembered. The same TCB Info and QE Identity are checked for every quote of a platform
    until Intel publishes new ones."""
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    try:
        verify_p256(key, signature, message, "")
    except EvidenceError:
        return False
    return True


def _certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise EvidenceError(f"the {what} does not parse: {e}") from None
    return chain


def _issued_by_root(
    pem: bytes, now: datetime.datetime, anchor: x509.Certificate, what: str
) -> x509.Certificate:
    """The one certificate of an issuer chain (signer, then root) that the root issued."""
    below_root = [c for c in _certificates(pem, what) if c.subject != anchor.subject]
    if len(below_root) != 1:
        raise EvidenceError(
            f"the {what} holds {len(below_root)} certificates below the root, not 1"
        )
    return verify_chain(below_root, now, anchor, f"the {what}")[0]


def _crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    try:
        pem = _PEM_CRL.search(data)
        if pem:
            return x509.load_pem_x509_crl(pem.group(0))
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise EvidenceError(f"the {what} does not parse: {e}") from None


def _check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, what: str) -> int:
    """The CRL number, once the CRL is shown to be ``issuer``'s."""
    if crl.issuer != issuer.subject:
        raise EvidenceError(
            f"the {what} is issued by {crl.issuer.rfc4514_string()}, expected "
            f"{issuer.subject.rfc4514_string()}"
        )
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        raise EvidenceError(f"the {what} signature does not verify")
    if crl.next_update_utc is None:
        raise EvidenceError(f"the {what} has no nextUpdate")
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        raise EvidenceError(f"the {what} has no CRL number") from None


def _not_revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate, what: str) -> None:
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise EvidenceError(f"{what} {cert.subject.rfc4514_string()} is revoked")


@dataclass(frozen=True)
class _Crls:
    root: x509.CertificateRevocationList
    root_number: int
    pck: x509.CertificateRevocationList
    pck_number: int
    certificates: tuple[x509.Certificate, ...]  # every verified certificate, for the dates


def _check_pck_and_crls(
    quote: Quote, collateral: Collateral, now: datetime.datetime, anchor: x509.Certificate
) -> tuple[x509.Certificate, _Crls]:
    links = verify_chain(quote.pck_chain, now, anchor, "the PCK chain")
    if len(links) != 2:
        raise EvidenceError("the PCK chain is not PCK certificate, PCK CA, root")
    pck, pck_ca = links
    root_crl = _crl(collateral.root_ca_crl, "Root CA CRL")
    root_number = _check_crl(root_crl, anchor, "Root CA CRL")
    crl_signer = _issued_by_root(collateral.pck_crl_issuer_chain, now, anchor, "PCK CRL chain")
    if crl_signer.public_key() != pck_ca.public_key() or crl_signer.subject != pck_ca.subject:
        raise EvidenceError("the PCK CRL issuer chain is not for the CA that issued the PCK")
    pck_crl = _crl(collateral.pck_crl, "PCK CRL")
    pck_number = _check_crl(pck_crl, pck_ca, "PCK CRL")
    _not_revoked(root_crl, pck_ca, "the PCK CA")
    _not_revoked(pck_crl, pck, "the PCK certificate")
    crls = _Crls(root_crl, root_number, pck_crl, pck_number, (anchor, pck, pck_ca, crl_signer))
    return pck, crls


def _signed_document(
    document: bytes,
    chain: bytes,
    member: str,
    *,
    now: datetime.datetime,
    anchor: x509.Certificate,
    root_crl: x509.CertificateRevocationList,
) -> tuple[bytes, x509.Certificate]:
    """The signed bytes of ``member``, once Intel's TCB signing key is shown to have signed
    them."""
    body, signature = signed_member(document, member)
    signer = _issued_by_root(chain, now, anchor, f"{member} issuer chain")
    # only the TCB signing key vouches for TCB data, not any other key the root certified
    names = signer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not any("SGX TCB Signing" in str(name.value) for name in names):
        raise EvidenceError(f"{signer.subject.rfc4514_string()} is no Intel SGX TCB Signing CA")
    _not_revoked(root_crl, signer, f"the {member} signer")
    _verify_p256(signer, signature, body, member)
    return body, signer


def _expired(items: dict[str, datetime.datetime], now: datetime.datetime, insecure: bool) -> bool:
    stale = sorted(name for name, next_update in items.items() if next_update <= now)
    if stale and not insecure:
        raise EvidenceError(
            f"expired collateral at {now.isoformat()}: {', '.join(stale)} "
            "(refresh the collateral from Intel PCS or the PCCS)"
        )
    return bool(stale)


@dataclass(frozen=True)
class _Documents:
    tcb_info: TcbInfo
    qe_identity: QeIdentity
    signers: tuple[x509.Certificate, ...]


def _check_documents(
    collateral: Collateral,
    now: datetime.datetime,
    anchor: x509.Certificate,
    root_crl: x509.CertificateRevocationList,
) -> _Documents:
    tcb_body, tcb_signer = _signed_document(
        collateral.tcb_info,
        collateral.tcb_info_issuer_chain,
        "tcbInfo",
        now=now,
        anchor=anchor,
        root_crl=root_crl,
    )
    qe_body, qe_signer = _signed_document(
        collateral.qe_identity,
        collateral.qe_identity_issuer_chain,
        "enclaveIdentity",
        now=now,
        anchor=anchor,
        root_crl=root_crl,
    )
    return _Documents(parse_tcb_info(tcb_body), parse_qe_identity(qe_body), (tcb_signer, qe_signer))


def verify_collateral(
    quote: Quote,
    collateral: Collateral,
    now: datetime.datetime,
    *,
    root: x509.Certificate | None = None,
    insecure_accept_expired_collateral: bool = False,
) -> CollateralVerdict:
    """Steps 1 to 5 of the module docstring; ``root`` defaults to the pinned Intel root."""
    if insecure_accept_expired_collateral:
        logger.warning("INSECURE: DCAP collateral past its nextUpdate is accepted")
    anchor = root or intel_root()
    pck, crls = _check_pck_and_crls(quote, collateral, now, anchor)
    documents = _check_documents(collateral, now, anchor, crls.root)
    tcb_info, qe_identity = documents.tcb_info, documents.qe_identity
    expiring = {
        "Root CA CRL": _next_update(crls.root),
        "PCK CRL": _next_update(crls.pck),
        "TCB Info": tcb_info.next_update,
        "QE Identity": qe_identity.next_update,
    }
    _expired(expiring, now, insecure_accept_expired_collateral)
    platform = PlatformTcb.from_extension(sgx_extension(pck))
    evaluation = evaluate_tcb(tcb_info, qe_identity, quote, platform)
    if evaluation.status is TcbStatus.REVOKED:
        raise EvidenceError("the platform's TCB is Revoked by Intel's TCB Info or QE Identity")
    certificates = (*crls.certificates, *documents.signers)
    issued = [
        crls.root.last_update_utc,
        crls.pck.last_update_utc,
        tcb_info.issue_date,
        qe_identity.issue_date,
        *(c.not_valid_before_utc for c in certificates),
    ]
    expiry = [*expiring.values(), *(c.not_valid_after_utc for c in certificates)]
    return CollateralVerdict(
        tcb_status=evaluation.status,
        advisory_ids=evaluation.level.advisory_ids,
        tcb_date=evaluation.level.tcb_date,
        collateral_expired=min(expiry) <= now,
        earliest_issue_date=min(issued),
        latest_issue_date=max(issued),
        earliest_expiration_date=min(expiry),
        tcb_eval_num=min(
            tcb_info.tcb_evaluation_data_number, qe_identity.tcb_evaluation_data_number
        ),
        pck_crl_num=crls.pck_number,
        root_ca_crl_num=crls.root_number,
        root_key_id=root_key_id(anchor),
        evaluation=evaluation,
        tcb_info=tcb_info,
        qe_identity=qe_identity,
    )


def root_key_id(root: x509.Certificate) -> bytes:
    """Upstream's ``root_key_id``: SHA-384 of the root's public key as an uncompressed point."""
    point = root.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return hashlib.sha384(point).digest()


def _next_update(crl: x509.CertificateRevocationList) -> datetime.datetime:
    next_update = crl.next_update_utc
    if next_update is None:  # refused by _check_crl already
        raise EvidenceError("a CRL has no nextUpdate")
    return next_update


def earliest_next_update(unverified: Collateral) -> datetime.datetime | None:
    """When this collateral should be fetched again (its earliest ``nextUpdate``), or None when
    it cannot be read. For caches only: nothing is verified, so decide nothing else with it."""
    try:
        moments = [
            _crl(unverified.root_ca_crl, "Root CA CRL").next_update_utc,
            _crl(unverified.pck_crl, "PCK CRL").next_update_utc,
            parse_tcb_info(signed_member(unverified.tcb_info, "tcbInfo")[0]).next_update,
            parse_qe_identity(
                signed_member(unverified.qe_identity, "enclaveIdentity")[0]
            ).next_update,
        ]
    except EvidenceError:
        return None
    return min((m for m in moments if m is not None), default=None)
