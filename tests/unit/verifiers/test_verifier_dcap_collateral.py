"""DCAP collateral: the recorded TCB Info and QE Identity parse and grade the recorded quotes as
Intel's library does; signatures, CRLs and dates are checked with collateral issued by a test
PKI standing in for Intel (the recorded vectors carry no issuer chains and no CRLs). Every
named attack is refused. Time is injected."""

from __future__ import annotations

import datetime
import json
import logging
import re
from dataclasses import replace

import pytest

from conftest import vector
from keybroker.errors import EvidenceError
from keybroker.verifiers.intel.dcap import Quote, TdReportBody, intel_root, parse_quote
from keybroker.verifiers.intel.dcap_collateral import (
    Collateral,
    CollateralRequest,
    collateral_request,
    earliest_next_update,
    root_key_id,
    signed_member,
    verify_collateral,
)
from keybroker.verifiers.intel.dcap_tcb import PlatformTcb, evaluate_tcb
from keybroker.verifiers.intel.dcap_tcb_info import TcbStatus, parse_qe_identity, parse_tcb_info
from keybroker.verifiers.intel.sgx_extensions import SGX_EXTENSION, sgx_extension
from standins.intel_pki import IntelPki, issue, signed_document

NOW = datetime.datetime(2025, 11, 1, tzinfo=datetime.UTC)  # inside the vectors' validity
UTC = datetime.UTC


def _vector(name: str) -> bytes:
    return vector("verifier", name).read_bytes()


def _quote(name: str) -> Quote:
    return parse_quote(_vector(name))


TCB_BODY, TCB_SIGNATURE = signed_member(_vector("tcbInfo.json"), "tcbInfo")
QE_BODY, QE_SIGNATURE = signed_member(_vector("enclaveIdentity.json"), "enclaveIdentity")


def _upstream_sgx_claims() -> dict[str, object]:
    path = vector("attestation-service", "example.token.json")
    token = json.loads(path.read_text())
    claims: dict[str, object] = token["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["sgx"]
    return claims


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _edit(body: bytes, change: dict[str, object]) -> bytes:
    document = json.loads(body)
    document.update(change)
    return _json(document)


@pytest.fixture(scope="module")
def pki() -> IntelPki:
    return IntelPki()


@pytest.fixture(scope="module")
def td(pki: IntelPki) -> Quote:
    """The recorded TDX quote whose FMSPC the recorded TCB Info is for, on the test PKI."""
    quote = _quote("tdx_quote_6.dat")
    return pki.quote(quote, pki.pck(quote.pck_chain[0]))


def _collateral(pki: IntelPki, **changes: object) -> Collateral:
    settings: dict[str, object] = {
        "tcb_info_body": TCB_BODY,
        "qe_identity_body": QE_BODY,
        "now": NOW,
        **changes,
    }
    return pki.collateral(**settings)  # type: ignore[arg-type]


# --- the recorded vectors --------------------------------------------------------------------


def test_recorded_documents_split_into_signed_bytes_and_signature() -> None:
    assert TCB_BODY.startswith(b'{"id":"TDX","version":3,') and TCB_BODY.endswith(b"}]}")
    assert QE_BODY.startswith(b'{"id":"TD_QE"') and len(TCB_SIGNATURE) == len(QE_SIGNATURE) == 64


def test_recorded_tcb_info_parses() -> None:
    info = parse_tcb_info(TCB_BODY)
    assert (info.id, info.version, info.fmspc.hex(), info.pce_id.hex()) == (
        "TDX",
        3,
        "00a06d080000",
        "0000",
    )
    assert info.tcb_evaluation_data_number == 17
    assert info.next_update == datetime.datetime(2025, 11, 26, 13, 7, 17, tzinfo=UTC)
    assert [level.pce_svn for level in info.tcb_levels] == [13, 5]
    assert [m.id for m in info.tdx_module_identities] == ["TDX_03", "TDX_01"]
    identity = parse_qe_identity(QE_BODY)
    assert (identity.id, identity.isvprodid, identity.tcb_levels[0].isvsvn) == ("TD_QE", 2, 4)


def test_recorded_quote_is_graded_against_recorded_collateral() -> None:
    """TDX quote 6: PCESVN 11 misses the PCESVN 13 level, so the 2018 level (OutOfDate)
    applies; module TDX_03 (ISVSVN 5 >= 3) and the TD QE (ISVSVN 7 >= 4) are up to date."""
    quote = _quote("tdx_quote_6.dat")
    platform = PlatformTcb.from_extension(sgx_extension(quote.pck_chain[0]))
    result = evaluate_tcb(parse_tcb_info(TCB_BODY), parse_qe_identity(QE_BODY), quote, platform)
    assert result.status is TcbStatus.OUT_OF_DATE
    assert result.level.tcb_date == datetime.datetime(2018, 1, 4, tzinfo=UTC)
    assert result.module_level is not None and result.module_level.isvsvn == 3
    assert result.qe_level.status is TcbStatus.UP_TO_DATE


def test_recorded_quotes_of_other_platforms_do_not_fit_the_recorded_tcb_info() -> None:
    for name in ("tdx_quote_4.dat", "tdx_quote_5.dat"):
        quote = _quote(name)
        platform = PlatformTcb.from_extension(sgx_extension(quote.pck_chain[0]))
        with pytest.raises(EvidenceError, match="FMSPC"):
            evaluate_tcb(parse_tcb_info(TCB_BODY), parse_qe_identity(QE_BODY), quote, platform)


def test_root_key_id_of_the_pinned_root_is_upstreams() -> None:
    assert root_key_id(intel_root()).hex() == _upstream_sgx_claims()["root_key_id"]


# --- full verification on the stand-in PKI --------------------------------------------------


def test_collateral_verifies_and_yields_upstreams_claims(pki: IntelPki, td: Quote) -> None:
    verdict = verify_collateral(td, _collateral(pki), NOW, root=pki.root.cert)
    claims = verdict.claims()
    sgx = _upstream_sgx_claims()
    collateral_names = {name for name in sgx if name not in _PARSE_CLAIMS}
    assert set(claims) == collateral_names
    for name, value in claims.items():
        assert type(value) is type(sgx[name]), name
    date = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
    assert all(date.fullmatch(str(claims[n])) for n in collateral_names if n.endswith("date"))
    assert claims["tcb_status"] == "OutOfDate" and claims["tcb_date"] == "2018-01-04T00:00:00Z"
    assert claims["collateral_expiration_status"] == "0" and claims["tcb_eval_num"] == 17
    assert claims["earliest_issue_date"] == "2025-01-01T00:00:00Z"  # the test root's notBefore
    assert claims["latest_issue_date"] == "2025-10-31T00:00:00Z"  # the CRLs' thisUpdate
    assert claims["earliest_expiration_date"] == "2025-11-26T13:07:17Z"  # TCB Info nextUpdate
    assert claims["root_key_id"] == root_key_id(pki.root.cert).hex()


_PARSE_CLAIMS = {
    "body",
    "header",
    "platform_provider_id",
    "sgx_type",
    "is_cached_keys",
    "is_dynamic_platform",
    "is_smt_enabled",
}


def test_collateral_request_names_what_the_quote_needs(pki: IntelPki, td: Quote) -> None:
    request = collateral_request(td, td.pck_chain[0])
    assert request == CollateralRequest("tdx", bytes.fromhex("00a06d080000"), "platform")


def test_signature_is_over_the_served_bytes_not_a_reserialization(pki: IntelPki, td: Quote) -> None:
    spaced = json.dumps(json.loads(TCB_BODY), indent=1).encode()  # same content, other bytes
    collateral = _collateral(pki, tcb_info_body=spaced)
    assert verify_collateral(td, collateral, NOW, root=pki.root.cert).tcb_info.id == "TDX"


def test_earliest_next_update_reads_unverified_collateral(pki: IntelPki) -> None:
    assert earliest_next_update(_collateral(pki)) == datetime.datetime(
        2025, 11, 26, 13, 7, 17, tzinfo=UTC
    )
    broken = replace(_collateral(pki), tcb_info=b"{}")
    assert earliest_next_update(broken) is None


# --- attacks ---------------------------------------------------------------------------------


def test_expired_collateral_is_refused(pki: IntelPki, td: Quote) -> None:
    later = datetime.datetime(2025, 11, 28, tzinfo=UTC)  # past TCB Info and QE Identity
    collateral = _collateral(pki, now=later)  # fresh CRLs: only the documents are stale
    with pytest.raises(EvidenceError, match=r"expired collateral.*QE Identity, TCB Info"):
        verify_collateral(td, collateral, later, root=pki.root.cert)


def test_expired_crl_is_refused(pki: IntelPki, td: Quote) -> None:
    collateral = _collateral(pki, now=datetime.datetime(2025, 10, 1, tzinfo=UTC))
    with pytest.raises(EvidenceError, match=r"expired collateral.*PCK CRL"):
        verify_collateral(td, collateral, NOW, root=pki.root.cert)


def test_expired_collateral_passes_only_when_insecure_and_says_so(
    pki: IntelPki, td: Quote, caplog: pytest.LogCaptureFixture
) -> None:
    later = datetime.datetime(2025, 11, 27, tzinfo=UTC)
    with caplog.at_level(logging.WARNING):
        verdict = verify_collateral(
            td,
            _collateral(pki, now=later),
            later,
            root=pki.root.cert,
            insecure_accept_expired_collateral=True,
        )
    assert verdict.claims()["collateral_expiration_status"] == "1"
    assert "INSECURE" in caplog.text


def test_revoked_pck_in_crl_is_refused(pki: IntelPki, td: Quote) -> None:
    collateral = _collateral(pki, revoked_pcks=(td.pck_chain[0],))
    with pytest.raises(EvidenceError, match=r"PCK certificate .* is revoked"):
        verify_collateral(td, collateral, NOW, root=pki.root.cert)


def test_revoked_pck_ca_in_root_crl_is_refused(pki: IntelPki, td: Quote) -> None:
    collateral = _collateral(pki, revoked_by_root=(pki.platform_ca.cert,))
    with pytest.raises(EvidenceError, match=r"PCK CA .* is revoked"):
        verify_collateral(td, collateral, NOW, root=pki.root.cert)


def test_revoked_tcb_signing_certificate_is_refused(pki: IntelPki, td: Quote) -> None:
    collateral = _collateral(pki, revoked_by_root=(pki.tcb_signing.cert,))
    with pytest.raises(EvidenceError, match=r"tcbInfo signer .* is revoked"):
        verify_collateral(td, collateral, NOW, root=pki.root.cert)


def test_tcb_info_signed_by_wrong_key_is_refused(pki: IntelPki, td: Quote) -> None:
    impostor = issue("Intel SGX TCB Signing", ca=False)
    forged = signed_document("tcbInfo", TCB_BODY, impostor.key)
    collateral = replace(_collateral(pki), tcb_info=forged)
    with pytest.raises(EvidenceError, match="tcbInfo signature does not verify"):
        verify_collateral(td, collateral, NOW, root=pki.root.cert)


def test_tcb_info_chain_to_another_root_is_refused(pki: IntelPki, td: Quote) -> None:
    rogue = IntelPki()  # the same names, other keys
    collateral = replace(
        _collateral(pki),
        tcb_info=signed_document("tcbInfo", TCB_BODY, rogue.tcb_signing.key),
        tcb_info_issuer_chain=rogue.chain(rogue.tcb_signing),
    )
    with pytest.raises(EvidenceError, match="does not verify against the root"):
        verify_collateral(td, collateral, NOW, root=pki.root.cert)


def test_tcb_info_signed_by_a_pck_ca_is_refused(pki: IntelPki, td: Quote) -> None:
    """The root certifies other keys too; only the TCB Signing key vouches for TCB data."""
    collateral = replace(
        _collateral(pki),
        tcb_info=signed_document("tcbInfo", TCB_BODY, pki.platform_ca.key),
        tcb_info_issuer_chain=pki.chain(pki.platform_ca),
    )
    with pytest.raises(EvidenceError, match="no Intel SGX TCB Signing"):
        verify_collateral(td, collateral, NOW, root=pki.root.cert)


def test_collateral_for_the_pinned_intel_root_rejects_a_test_root_chain(
    pki: IntelPki, td: Quote
) -> None:
    with pytest.raises(EvidenceError, match="PCK chain"):
        verify_collateral(td, _collateral(pki), NOW)  # default root: Intel's, pinned


def test_tampered_tcb_info_is_refused(pki: IntelPki, td: Quote) -> None:
    collateral = _collateral(pki)
    tampered = collateral.tcb_info.replace(b'"OutOfDate"', b'"UpToDate"')
    with pytest.raises(EvidenceError, match="tcbInfo signature does not verify"):
        verify_collateral(td, replace(collateral, tcb_info=tampered), NOW, root=pki.root.cert)


def test_second_tcb_info_member_is_refused(pki: IntelPki, td: Quote) -> None:
    """A parser differential: one member signed, a duplicate evaluated."""
    collateral = _collateral(pki)
    rogue = _edit(TCB_BODY, {"tcbEvaluationDataNumber": 99})
    smuggled = collateral.tcb_info[:-1] + b',"tcbInfo":' + rogue + b"}"
    with pytest.raises(EvidenceError, match="repeats the key 'tcbInfo'"):
        verify_collateral(td, replace(collateral, tcb_info=smuggled), NOW, root=pki.root.cert)


def test_fmspc_mismatch_is_refused(pki: IntelPki) -> None:
    quote = _quote("tdx_quote_6.dat")
    other = pki.quote(quote, pki.pck(quote.pck_chain[0], fmspc=bytes.fromhex("90c06f000000")))
    with pytest.raises(EvidenceError, match=r"TCB Info is for FMSPC 00A06D080000.*90C06F000000"):
        verify_collateral(other, _collateral(pki), NOW, root=pki.root.cert)


def test_pck_crl_signed_by_another_ca_is_refused(pki: IntelPki, td: Quote) -> None:
    rogue = IntelPki()
    crl = rogue.crl(
        rogue.platform_ca, this_update=NOW, next_update=NOW + datetime.timedelta(days=30)
    )
    with pytest.raises(EvidenceError, match="PCK CRL"):
        verify_collateral(td, replace(_collateral(pki), pck_crl=crl), NOW, root=pki.root.cert)


def test_sgx_tcb_info_for_a_td_is_refused(pki: IntelPki, td: Quote) -> None:
    sgx = _edit(TCB_BODY, {"id": "SGX"})
    sgx_info = json.loads(sgx)
    del sgx_info["tdxModule"], sgx_info["tdxModuleIdentities"]
    for level in sgx_info["tcbLevels"]:
        del level["tcb"]["tdxtcbcomponents"]
    collateral = _collateral(pki, tcb_info_body=_json(sgx_info))
    with pytest.raises(EvidenceError, match="TCB Info is SGX version 3, the quote is TDX"):
        verify_collateral(td, collateral, NOW, root=pki.root.cert)


def test_qe_identity_of_another_enclave_is_refused(pki: IntelPki, td: Quote) -> None:
    other = _edit(QE_BODY, {"mrsigner": "AB" * 32})
    with pytest.raises(EvidenceError, match="MRSIGNER"):
        verify_collateral(td, _collateral(pki, qe_identity_body=other), NOW, root=pki.root.cert)


def test_revoked_tcb_level_is_refused(pki: IntelPki, td: Quote) -> None:
    info = json.loads(TCB_BODY)
    info["tcbLevels"][1]["tcbStatus"] = "Revoked"
    with pytest.raises(EvidenceError, match="Revoked"):
        verify_collateral(td, _collateral(pki, tcb_info_body=_json(info)), NOW, root=pki.root.cert)


# --- TCB level selection, as Intel's library does it -------------------------------------------


def _components(svns: list[int]) -> list[dict[str, int]]:
    return [{"svn": svn} for svn in svns + [0] * (16 - len(svns))]


def _level(
    sgx: list[int], pce: int, status: str, tdx: list[int] | None = None, **extra: object
) -> dict[str, object]:
    tcb: dict[str, object] = {"sgxtcbcomponents": _components(sgx), "pcesvn": pce}
    if tdx is not None:
        tcb["tdxtcbcomponents"] = _components(tdx)
    return {"tcb": tcb, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": status, **extra}


def _isv(svn: int, status: str, *advisories: str) -> dict[str, object]:
    return {
        "tcb": {"isvsvn": svn},
        "tcbDate": "2024-03-13T00:00:00Z",
        "tcbStatus": status,
        "advisoryIDs": list(advisories),
    }


OCCLUM_FMSPC = "00606A000000"  # the recorded SGX quote's platform


def _sgx_tcb_info(levels: list[dict[str, object]]) -> bytes:
    return _json(
        {
            "id": "SGX",
            "version": 3,
            "issueDate": "2025-10-27T00:00:00Z",
            "nextUpdate": "2025-11-26T00:00:00Z",
            "fmspc": OCCLUM_FMSPC,
            "pceId": "0000",
            "tcbType": 0,
            "tcbEvaluationDataNumber": 18,
            "tcbLevels": levels,
        }
    )


def _sgx_qe_identity(*levels: dict[str, object]) -> bytes:
    return _json(
        {
            "id": "QE",
            "version": 2,
            "issueDate": "2025-10-28T00:00:00Z",
            "nextUpdate": "2025-11-27T00:00:00Z",
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": "8C4F5775D796503E96137F77C68A829A0056AC8DED70140B081B094490C57BFF",
            "isvprodid": 1,
            "tcbLevels": list(levels),
        }
    )


def _grade(quote: Quote, tcb_info: bytes, qe_identity: bytes) -> tuple[TcbStatus, object]:
    platform = PlatformTcb.from_extension(sgx_extension(quote.pck_chain[0]))
    result = evaluate_tcb(parse_tcb_info(tcb_info), parse_qe_identity(qe_identity), quote, platform)
    return result.status, result.level.advisory_ids


# the recorded SGX quote: PCK components 4,4,3,3,255,255,0..., PCESVN 11; QE ISVSVN 8
SGX_LEVELS = [
    _level([5, 5, 3, 3, 255, 255], 13, "UpToDate"),
    _level([2, 2, 2, 2], 5, "OutOfDate", advisoryIDs=["INTEL-SA-00334", "INTEL-SA-00615"]),
    _level([4, 4, 3, 3, 255, 255], 11, "ConfigurationNeeded", advisoryIDs=["INTEL-SA-00615"]),
]


def test_sgx_level_is_the_highest_met_whatever_the_json_order() -> None:
    quote, qe = _quote("occlum_quote.dat"), _sgx_qe_identity(_isv(8, "UpToDate"))
    expected = (TcbStatus.CONFIGURATION_NEEDED, ("INTEL-SA-00615",))
    assert _grade(quote, _sgx_tcb_info(SGX_LEVELS), qe) == expected
    assert _grade(quote, _sgx_tcb_info(SGX_LEVELS[::-1]), qe) == expected


def test_qe_out_of_date_converges_as_intel_does() -> None:
    """Not "the worse of the two": Intel folds a stale QE into ConfigurationNeeded as
    OutOfDateConfigurationNeeded, and reports the platform level's advisories only."""
    quote = _quote("occlum_quote.dat")
    qe = _sgx_qe_identity(_isv(9, "UpToDate"), _isv(8, "OutOfDate", "INTEL-SA-00999"))
    assert _grade(quote, _sgx_tcb_info(SGX_LEVELS), qe) == (
        TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED,
        ("INTEL-SA-00615",),
    )


def test_duplicate_tcb_levels_are_refused() -> None:
    with pytest.raises(EvidenceError, match="same TCB level twice"):
        parse_tcb_info(_sgx_tcb_info([*SGX_LEVELS, SGX_LEVELS[0]]))


def test_platform_below_every_level_is_refused() -> None:
    quote, qe = _quote("occlum_quote.dat"), _sgx_qe_identity(_isv(8, "UpToDate"))
    with pytest.raises(EvidenceError, match="below every level"):
        _grade(quote, _sgx_tcb_info([SGX_LEVELS[0]]), qe)


def test_qe_below_every_level_is_refused() -> None:
    quote, qe = _quote("occlum_quote.dat"), _sgx_qe_identity(_isv(9, "UpToDate"))
    with pytest.raises(EvidenceError, match="QE's ISVSVN 8 is below every level"):
        _grade(quote, _sgx_tcb_info(SGX_LEVELS), qe)


def _td15(tdx_levels: list[dict[str, object]], svn2: bytes | None = None) -> TcbStatus:
    """TDX quote 5 (TD 1.5; TEE_TCB_SVN 05 01 02: module ISVSVN 5, version 1) graded by a TCB
    Info for its platform with the given levels and module TDX_01 (ISVSVN 7 up to date,
    2 out of date)."""
    quote = _quote("tdx_quote_5.dat")
    body = quote.body
    assert isinstance(body, TdReportBody)
    if svn2 is not None:
        quote = replace(quote, body=replace(body, tee_tcb_svn2=svn2))
    module = {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8}
    info = json.loads(TCB_BODY)
    info.update(
        fmspc="90C06F000000",
        tcbLevels=tdx_levels,
        tdxModule=module,
        tdxModuleIdentities=[
            {**module, "id": "TDX_01", "tcbLevels": [_isv(7, "UpToDate"), _isv(2, "OutOfDate")]}
        ],
    )
    return _grade(quote, _json(info), QE_BODY)[0]


# PCK of TDX quote 5: components 1,1,2,2,3,1,0,3..., PCESVN 13
TD_LEVELS = [
    _level([1, 1, 2, 2, 3, 1, 0, 3], 13, "UpToDate", tdx=[7, 1, 3]),
    _level([1, 1, 2, 2, 3, 1, 0, 3], 13, "OutOfDate", tdx=[0, 0, 2]),
]


def test_td_module_out_of_date_lowers_the_status() -> None:
    # the first two TDX components (module ISVSVN, version) are graded by TDX_01, not here
    assert _td15(TD_LEVELS) is TcbStatus.OUT_OF_DATE
    assert _td15([_level([1, 1, 2, 2, 3, 1, 0, 3], 13, "UpToDate", tdx=[99, 99, 2])]) is (
        TcbStatus.OUT_OF_DATE  # module ISVSVN 5 is TDX_01's OutOfDate level
    )


def test_td_1_5_updated_in_place_is_advised_to_relaunch() -> None:
    current = bytes([7, 1, 3]) + bytes(13)  # TEE_TCB_SVN2: module 7 and TDX component 3
    assert _td15(TD_LEVELS, svn2=current) is TcbStatus.TD_RELAUNCH_ADVISED


def test_td_module_of_another_signer_is_refused() -> None:
    info = json.loads(TCB_BODY)
    info["tdxModuleIdentities"][0]["mrsigner"] = "11" * 48  # TDX_03, quote 6's module
    quote = _quote("tdx_quote_6.dat")
    with pytest.raises(EvidenceError, match="MRSIGNER_SEAM"):
        _grade(quote, _json(info), QE_BODY)


def test_td_module_version_without_identity_is_refused() -> None:
    info = json.loads(TCB_BODY)
    info["tdxModuleIdentities"] = [info["tdxModuleIdentities"][1]]  # no TDX_03
    with pytest.raises(EvidenceError, match="no TDX module identity TDX_03"):
        _grade(_quote("tdx_quote_6.dat"), _json(info), QE_BODY)


def test_full_sgx_verification_on_the_stand_in_pki(pki: IntelPki) -> None:
    recorded = _quote("occlum_quote.dat")
    quote = pki.quote(recorded, pki.pck(recorded.pck_chain[0]))
    collateral = pki.collateral(
        tcb_info_body=_sgx_tcb_info(SGX_LEVELS),
        qe_identity_body=_sgx_qe_identity(_isv(8, "UpToDate")),
        now=NOW,
    )
    verdict = verify_collateral(quote, collateral, NOW, root=pki.root.cert)
    assert verdict.claims()["tcb_status"] == "ConfigurationNeeded"
    assert verdict.claims()["advisory_ids"] == ["INTEL-SA-00615"]
    assert verdict.tcb_eval_num == 17  # the lower of TCB Info's 18 and QE Identity's 17
    assert collateral_request(quote, quote.pck_chain[0]).tee == "sgx"


def test_td_qe_identity_for_an_sgx_quote_is_refused(pki: IntelPki) -> None:
    recorded = _quote("occlum_quote.dat")
    quote = pki.quote(recorded, pki.pck(recorded.pck_chain[0]))
    collateral = pki.collateral(
        tcb_info_body=_sgx_tcb_info(SGX_LEVELS), qe_identity_body=QE_BODY, now=NOW
    )
    with pytest.raises(EvidenceError, match="QE Identity is 'TD_QE'"):
        verify_collateral(quote, collateral, NOW, root=pki.root.cert)


def test_oversized_collateral_is_refused() -> None:
    big = b"x" * (1024 * 1024 + 1)
    with pytest.raises(EvidenceError, match="over"):
        Collateral(big, b"c", b"q", b"c", b"p", b"c", b"r")


def test_pck_of_a_non_intel_ca_gets_no_collateral_request() -> None:
    quote = _quote("tdx_quote_6.dat")
    extension = quote.pck_chain[0].extensions.get_extension_for_oid(SGX_EXTENSION).value
    stray = issue("Some Other CA", ca=True)
    pck = issue("Intel SGX PCK Certificate", stray, ca=False, extension=extension)
    with pytest.raises(EvidenceError, match="no Intel PCK CA"):
        collateral_request(quote, pck.cert)


def test_version_2_tcb_info_grades_like_version_3() -> None:
    """TCB Info v2 (PCS API v3) spells components as sgxtcbcompNNsvn and has no id."""
    quote, qe = _quote("occlum_quote.dat"), _sgx_qe_identity(_isv(8, "UpToDate"))
    levels = []
    for level in SGX_LEVELS:
        tcb = dict(level["tcb"])  # type: ignore[call-overload]
        svns = [component["svn"] for component in tcb.pop("sgxtcbcomponents")]
        tcb.update({f"sgxtcbcomp{i:02d}svn": svn for i, svn in enumerate(svns, 1)})
        levels.append({**level, "tcb": tcb})
    info = json.loads(_sgx_tcb_info(levels))
    del info["id"]
    info["version"] = 2
    assert _grade(quote, _json(info), qe) == (TcbStatus.CONFIGURATION_NEEDED, ("INTEL-SA-00615",))
