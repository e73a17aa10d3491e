"""The TCB status of a DCAP quote's platform, decided from verified TCB Info and QE Identity the
way Intel's Quote Verification Library decides it (the library upstream Trustee calls).

Pure: parsed quote, PCK facts and collateral models in, a :class:`TcbEvaluation` out. The steps
and their order are Intel's (the numbers are those of Intel's verification spec, as cited in
its code):

* 4.1.2.4.9-10: the TCB Info is for the quote's TEE (``SGX`` / ``TDX``) and for the PCK
  certificate's FMSPC and PCE-ID;
* 4.1.2.4.11: a TD's MRSIGNER_SEAM and SEAM_ATTRIBUTES match the TDX module (``tdxModule``, or
  the ``tdxModuleIdentities`` entry ``TDX_<module version>`` when the version is not 0);
* 4.1.2.4.14-15: the QE report matches the QE Identity (id, MISCSELECT and ATTRIBUTES under
  their masks, MRSIGNER, ISVPRODID) and its ISVSVN selects a QE TCB level;
* 4.1.2.4.17: the platform's TCB level is the highest one whose SGX components and PCESVN the
  PCK certificate meets and, for a TD, whose TDX components the TD report's TEE_TCB_SVN meets;
  the TDX module's and the QE's levels can only lower its status (OutOfDate and Revoked carry
  over), and a TD 1.5 may be advised to relaunch.

What Intel treats as terminal (no level matches, a module or QE mismatch) raises
:class:`EvidenceError`; a ``Revoked`` outcome is returned and left to the caller to refuse.
It does not check signatures, dates or revocation: that is the collateral layer's work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from keybroker.errors import EvidenceError
from keybroker.verifiers.intel.dcap import TEE_TDX, Quote, SgxReportBody, TdReportBody
from keybroker.verifiers.intel.dcap_tcb_info import (
    COMPONENTS,
    IsvTcbLevel,
    QeIdentity,
    TcbInfo,
    TcbLevel,
    TcbStatus,
    TdxModuleIdentity,
)
from keybroker.verifiers.intel.sgx_extensions import Value

_S = TcbStatus
_NEEDS_CONFIGURATION = frozenset(
    {
        _S.CONFIGURATION_NEEDED,
        _S.OUT_OF_DATE_CONFIGURATION_NEEDED,
        _S.CONFIGURATION_AND_SW_HARDENING_NEEDED,
        _S.TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED,
    }
)
_RELAUNCHABLE_SGX = frozenset(
    {
        _S.UP_TO_DATE,
        _S.SW_HARDENING_NEEDED,
        _S.CONFIGURATION_NEEDED,
        _S.CONFIGURATION_AND_SW_HARDENING_NEEDED,
    }
)


@dataclass(frozen=True)
class PlatformTcb:
    """What the (verified) PCK certificate says about the platform."""

    components: tuple[int, ...]  # tcb_comp1..16
    pce_svn: int
    fmspc: bytes
    pce_id: bytes

    @classmethod
    def from_extension(cls, extension: dict[str, Value]) -> PlatformTcb:
        """From :func:`~keybroker.verifiers.intel.sgx_extensions.sgx_extension` of a verified
        PCK."""
        components = [extension.get(f"tcb_comp{i}") for i in range(1, COMPONENTS + 1)]
        pce_svn, fmspc, pce_id = (extension.get(k) for k in ("pcesvn", "fmspc", "pceid"))
        svns = [value for value in (*components, pce_svn) if type(value) is int]
        if len(svns) != COMPONENTS + 1:
            raise EvidenceError("the PCK certificate's TCB components or PCESVN are missing")
        if not (isinstance(fmspc, bytes) and len(fmspc) == 6):
            raise EvidenceError("the PCK certificate carries no 6-byte FMSPC")
        if not (isinstance(pce_id, bytes) and len(pce_id) == 2):
            raise EvidenceError("the PCK certificate carries no 2-byte PCE-ID")
        return cls(tuple(int(svn) for svn in svns[:-1]), int(svns[-1]), fmspc, pce_id)


@dataclass(frozen=True)
class TcbEvaluation:
    status: TcbStatus  # the converged status upstream reports as ``tcb_status``
    level: TcbLevel  # the TCB Info level matched: upstream's ``tcb_date`` and ``advisory_ids``
    qe_level: IsvTcbLevel
    module_level: IsvTcbLevel | None  # a TD's TDX module level, when a module identity applies


def evaluate_tcb(
    tcb_info: TcbInfo, qe_identity: QeIdentity, quote: Quote, platform: PlatformTcb
) -> TcbEvaluation:
    td = quote.body if isinstance(quote.body, TdReportBody) else None
    _check_tcb_info_fits(tcb_info, quote, platform)
    if td is not None:
        _check_tdx_module(tcb_info, td)
    qe_level = qe_tcb_level(qe_identity, quote.qe_report, tdx=td is not None)
    qe_status = _qe_status(qe_level.status)
    sgx_level, tdx_level = match_tcb_levels(
        tcb_info.tcb_levels, platform, td.tcb_svn if td else None
    )
    if sgx_level is None:
        raise EvidenceError(
            f"the platform TCB (PCK components {list(platform.components)}, PCESVN "
            f"{platform.pce_svn}) is below every level of the TCB Info"
        )
    if td is None:
        return TcbEvaluation(_converge(sgx_level.status, qe_status), sgx_level, qe_level, None)
    if tdx_level is None:
        raise EvidenceError(
            f"the TD's TEE_TCB_SVN {td.tcb_svn.hex()} is below every level of the TCB Info"
        )
    module_level = _module_level(tcb_info, td)
    module_status = module_level.status if module_level else _S.UP_TO_DATE
    status = _converge(tdx_level.status, module_status)
    if td.tee_tcb_svn2 is not None:  # a TD 1.5 may only need relaunching
        status = _relaunch(
            status,
            sgx_status=sgx_level.status,
            module_status=module_status,
            qe_status=qe_status,
            tcb_info=tcb_info,
            td=td,
        )
    return TcbEvaluation(_converge(status, qe_status), tdx_level, qe_level, module_level)


def _check_tcb_info_fits(tcb_info: TcbInfo, quote: Quote, platform: PlatformTcb) -> None:
    tee = "TDX" if quote.header.tee_type == TEE_TDX else "SGX"
    if tcb_info.id != tee or (tee == "TDX" and tcb_info.version < 3):
        raise EvidenceError(
            f"the TCB Info is {tcb_info.id} version {tcb_info.version}, the quote is {tee}"
        )
    # a TCB Info for another platform model would grade this platform by the wrong table
    if tcb_info.fmspc != platform.fmspc:
        raise EvidenceError(
            f"the TCB Info is for FMSPC {tcb_info.fmspc.hex().upper()}, the PCK certificate's "
            f"FMSPC is {platform.fmspc.hex().upper()}"
        )
    if tcb_info.pce_id != platform.pce_id:
        raise EvidenceError(
            f"the TCB Info is for PCE-ID {tcb_info.pce_id.hex()}, the PCK certificate's PCE-ID "
            f"is {platform.pce_id.hex()}"
        )


def _module_identity(tcb_info: TcbInfo, version: int) -> TdxModuleIdentity:
    wanted = f"TDX_{version:02X}"
    for identity in tcb_info.tdx_module_identities:
        if identity.id.upper() == wanted:
            return identity
    raise EvidenceError(f"the TCB Info has no TDX module identity {wanted}")


def _check_tdx_module(tcb_info: TcbInfo, td: TdReportBody) -> None:
    expected = tcb_info.tdx_module
    if expected is None:
        raise EvidenceError("the TDX TCB Info has no tdxModule")
    if td.tcb_svn[1] > 0:
        expected = _module_identity(tcb_info, td.tcb_svn[1])
    if td.mrsigner_seam != expected.mrsigner:
        raise EvidenceError(
            f"the TD's MRSIGNER_SEAM {td.mrsigner_seam.hex()} is not the TDX module's "
            f"{expected.mrsigner.hex()}"
        )
    # Intel's check, kept as is: every SEAM_ATTRIBUTES byte must be zero and equal the
    # expected byte; the attributes mask is not consulted
    if any(td.seam_attributes) or td.seam_attributes != expected.attributes:
        raise EvidenceError(
            f"the TD's SEAM_ATTRIBUTES {td.seam_attributes.hex()} are not the TDX module's "
            f"{expected.attributes.hex()}"
        )


def _masked(value: bytes, mask: bytes) -> bytes:
    return bytes(a & b for a, b in zip(value, mask, strict=True))


def qe_tcb_level(identity: QeIdentity, report: SgxReportBody, *, tdx: bool) -> IsvTcbLevel:
    """The QE Identity level of a QE report that matches the identity, else EvidenceError."""
    expected_id = "TD_QE" if tdx else "QE"
    if identity.id != expected_id:
        raise EvidenceError(f"the QE Identity is {identity.id!r}, the quote needs {expected_id!r}")
    if _masked(report.misc_select, identity.miscselect_mask) != identity.miscselect:
        raise EvidenceError("the QE report's MISCSELECT does not match the QE Identity")
    if _masked(report.attributes, identity.attributes_mask) != identity.attributes:
        raise EvidenceError("the QE report's ATTRIBUTES do not match the QE Identity")
    if report.mr_signer != identity.mrsigner:
        raise EvidenceError(
            f"the QE's MRSIGNER {report.mr_signer.hex()} is not the QE Identity's "
            f"{identity.mrsigner.hex()}"
        )
    prod_id = int.from_bytes(report.isv_prod_id, "little")
    if prod_id != identity.isvprodid:
        raise EvidenceError(f"the QE's ISVPRODID {prod_id} is not {identity.isvprodid}")
    isv_svn = int.from_bytes(report.isv_svn, "little")
    for level in identity.tcb_levels:  # Intel takes the document's order, highest first
        if level.isvsvn <= isv_svn:
            return level
    raise EvidenceError(f"the QE's ISVSVN {isv_svn} is below every level of the QE Identity")


def _qe_status(status: TcbStatus) -> TcbStatus:
    if status in (_S.UP_TO_DATE, _S.REVOKED):
        return status
    return _S.OUT_OF_DATE  # Intel reads any other QE level as "ISVSVN out of date"


def _meets(have: Sequence[int], need: Sequence[int]) -> bool:
    return all(a >= b for a, b in zip(have, need, strict=True))


def match_tcb_levels(
    levels: tuple[TcbLevel, ...], platform: PlatformTcb, tee_tcb_svn: bytes | None
) -> tuple[TcbLevel | None, TcbLevel | None]:
    """(SGX level, TDX level): the first (highest) levels the platform meets; SGX only when
    ``tee_tcb_svn`` is None."""
    sgx_level = None
    for level in levels:
        if not (_meets(platform.components, level.sgx_components)):
            continue
        if platform.pce_svn < level.pce_svn:
            continue
        if tee_tcb_svn is None:
            return level, None
        sgx_level = sgx_level or level
        # with a module identity (version byte > 0) its first two SVNs are graded there
        start = 2 if tee_tcb_svn[1] > 0 else 0
        if _meets(tee_tcb_svn[start:], level.tdx_components[start:]):
            return sgx_level, level
    return sgx_level, None


def _module_level(tcb_info: TcbInfo, td: TdReportBody) -> IsvTcbLevel | None:
    isv_svn, version = td.tcb_svn[0], td.tcb_svn[1]
    if version == 0:
        return None
    identity = _module_identity(tcb_info, version)
    for level in identity.tcb_levels:
        if isv_svn >= level.isvsvn:
            return level
    raise EvidenceError(f"the TDX module's ISVSVN {isv_svn} is below every level of {identity.id}")


def _converge(status: TcbStatus, lowering: TcbStatus) -> TcbStatus:
    """Intel's rule for folding a QE or TDX module status into the platform status."""
    if lowering is _S.OUT_OF_DATE:
        if status in (_S.UP_TO_DATE, _S.SW_HARDENING_NEEDED):
            return _S.OUT_OF_DATE
        if status in (_S.CONFIGURATION_NEEDED, _S.CONFIGURATION_AND_SW_HARDENING_NEEDED):
            return _S.OUT_OF_DATE_CONFIGURATION_NEEDED
    if lowering is _S.REVOKED:
        return _S.REVOKED
    return status


def _relaunch(
    status: TcbStatus,
    *,
    sgx_status: TcbStatus,
    module_status: TcbStatus,
    qe_status: TcbStatus,
    tcb_info: TcbInfo,
    td: TdReportBody,
) -> TcbStatus:
    """A TD 1.5 out of date only because its TDX module was updated while it ran is advised
    to relaunch rather than graded out of date (Intel's TD relaunch check)."""
    svn2 = td.tee_tcb_svn2
    if (
        svn2 is None
        or qe_status is not _S.UP_TO_DATE
        or sgx_status not in _RELAUNCHABLE_SGX
        or status not in (_S.OUT_OF_DATE, _S.OUT_OF_DATE_CONFIGURATION_NEEDED)
        or module_status is not _S.OUT_OF_DATE
    ):
        return status
    latest = tcb_info.tcb_levels[0]
    if svn2[1] == 0:
        current = svn2[0] >= latest.tdx_components[0]
    else:
        module = _module_identity(tcb_info, svn2[1])
        current = svn2[0] >= module.tcb_levels[0].isvsvn
    if not (current and svn2[2] >= latest.tdx_components[2]):
        return status
    if sgx_status in _NEEDS_CONFIGURATION or status in _NEEDS_CONFIGURATION:
        return _S.TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED
    return _S.TD_RELAUNCH_ADVISED
