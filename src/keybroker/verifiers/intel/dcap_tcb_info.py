"""Intel TCB Info and QE Identity: the signed JSON bodies parsed into typed, frozen models.

Pure: bytes in, values out. Nothing here checks a signature: the collateral layer
(:mod:`keybroker.verifiers.intel.dcap_collateral`) verifies Intel's signature over the exact bytes
first and hands those same bytes here, so what is evaluated is what was signed. Parsing is
strict in the way Intel's Quote Verification Library is: unknown versions, ids, TCB types and
status strings, component lists that are not 16 long and duplicated TCB levels are refused.
The TCB levels come out highest first, ordered by (SGX components, PCESVN, TDX components) as
Intel's library orders them, whatever their order in the JSON; the TCB status decision itself
is :mod:`keybroker.verifiers.intel.dcap_tcb`.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from keybroker.errors import EvidenceError

COMPONENTS = 16


class TcbStatus(StrEnum):
    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    TD_RELAUNCH_ADVISED = "TDRelaunchAdvised"
    TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED = "TDRelaunchAdvisedConfigurationNeeded"
    REVOKED = "Revoked"


_S = TcbStatus
_PLATFORM_STATUSES = frozenset(
    {
        _S.UP_TO_DATE,
        _S.SW_HARDENING_NEEDED,
        _S.CONFIGURATION_NEEDED,
        _S.CONFIGURATION_AND_SW_HARDENING_NEEDED,
        _S.OUT_OF_DATE,
        _S.OUT_OF_DATE_CONFIGURATION_NEEDED,
        _S.REVOKED,
    }
)
# the statuses Intel's parsers accept for QE Identity and TDX module levels
_QE_STATUSES = frozenset(
    {
        _S.UP_TO_DATE,
        _S.CONFIGURATION_NEEDED,
        _S.OUT_OF_DATE,
        _S.OUT_OF_DATE_CONFIGURATION_NEEDED,
        _S.REVOKED,
    }
)
_MODULE_STATUSES = frozenset({_S.UP_TO_DATE, _S.OUT_OF_DATE, _S.REVOKED})


@dataclass(frozen=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...]  # empty for SGX TCB Info
    tcb_date: datetime.datetime
    status: TcbStatus
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class IsvTcbLevel:
    """A level of a QE Identity or a TDX module identity, keyed by one ISVSVN."""

    isvsvn: int
    tcb_date: datetime.datetime
    status: TcbStatus
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class TdxModuleIdentity:
    id: str  # "" for the base ``tdxModule``
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[IsvTcbLevel, ...]


@dataclass(frozen=True)
class TcbInfo:
    id: str  # "SGX" or "TDX"
    version: int
    issue_date: datetime.datetime
    next_update: datetime.datetime
    fmspc: bytes
    pce_id: bytes
    tcb_evaluation_data_number: int
    tcb_levels: tuple[TcbLevel, ...]  # highest first, as Intel orders them
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]


@dataclass(frozen=True)
class QeIdentity:
    id: str  # "QE" (SGX) or "TD_QE" (TDX)
    version: int
    issue_date: datetime.datetime
    next_update: datetime.datetime
    tcb_evaluation_data_number: int
    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    tcb_levels: tuple[IsvTcbLevel, ...]  # in document order, highest first


def load_json_object(raw: bytes, what: str) -> dict[str, object]:
    """One JSON object; duplicate keys and NaN are refused so no two parsers can disagree."""

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in items:
            if key in out:
                raise EvidenceError(f"{what} repeats the key {key!r}")
            out[key] = value
        return out

    def constant(name: str) -> object:
        raise EvidenceError(f"{what} holds the non-JSON number {name}")

    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise EvidenceError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise EvidenceError(f"{what} is not a JSON object")
    return value


class _Fields:
    """Typed reads from one untrusted JSON object; each failure names the field it read."""

    def __init__(self, value: object, what: str) -> None:
        if not isinstance(value, dict):
            raise EvidenceError(f"{what} is not a JSON object")
        self._value: dict[str, object] = value
        self.what = what

    def has(self, key: str) -> bool:
        return key in self._value

    def _get(self, key: str) -> object:
        if key not in self._value:
            raise EvidenceError(f"{self.what} has no {key!r}")
        return self._value[key]

    def integer(self, key: str, maximum: int = 2**32 - 1) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            raise EvidenceError(f"{self.what}.{key} is not an integer from 0 to {maximum}")
        return value

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise EvidenceError(f"{self.what}.{key} is not a string")
        return value

    def hexbytes(self, key: str, size: int) -> bytes:
        value = self.text(key)
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) != size or len(value) != 2 * size:
            raise EvidenceError(f"{self.what}.{key} is not {size} bytes of hex")
        return raw

    def date(self, key: str) -> datetime.datetime:
        value = self.text(key)
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise EvidenceError(f"{self.what}.{key} is not an ISO 8601 date: {value!r}") from None
        if parsed.utcoffset() != datetime.timedelta(0):
            raise EvidenceError(f"{self.what}.{key} is not a UTC date: {value!r}")
        return parsed

    def status(self, key: str, allowed: frozenset[TcbStatus]) -> TcbStatus:
        value = self.text(key)
        if value not in {status.value for status in allowed}:
            raise EvidenceError(f"{self.what}.{key} {value!r} is not a recognised TCB status")
        return TcbStatus(value)

    def objects(self, key: str) -> list[_Fields]:
        value = self._get(key)
        if not isinstance(value, list) or not value:
            raise EvidenceError(f"{self.what}.{key} is not a non-empty list")
        return [_Fields(item, f"{self.what}.{key}[{index}]") for index, item in enumerate(value)]

    def child(self, key: str) -> _Fields:
        return _Fields(self._get(key), f"{self.what}.{key}")

    def texts(self, key: str) -> tuple[str, ...]:
        value = self._value.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise EvidenceError(f"{self.what}.{key} is not a list of strings")
        return tuple(str(item) for item in value)


def _svns(items: list[_Fields]) -> tuple[int, ...]:
    if len(items) != COMPONENTS:
        raise EvidenceError(f"a TCB level has {len(items)} components, not {COMPONENTS}")
    return tuple(item.integer("svn", 255) for item in items)


def _tcb_level(level: _Fields, version: int, tdx: bool) -> TcbLevel:
    tcb = level.child("tcb")
    if version == 2:
        sgx = tuple(tcb.integer(f"sgxtcbcomp{i:02d}svn", 255) for i in range(1, COMPONENTS + 1))
    else:
        sgx = _svns(tcb.objects("sgxtcbcomponents"))
    return TcbLevel(
        sgx_components=sgx,
        pce_svn=tcb.integer("pcesvn", 0xFFFF),
        tdx_components=_svns(tcb.objects("tdxtcbcomponents")) if tdx else (),
        tcb_date=level.date("tcbDate"),
        status=level.status("tcbStatus", _PLATFORM_STATUSES),
        advisory_ids=level.texts("advisoryIDs"),
    )


def _isv_levels(fields: _Fields, allowed: frozenset[TcbStatus]) -> tuple[IsvTcbLevel, ...]:
    return tuple(
        IsvTcbLevel(
            isvsvn=level.child("tcb").integer("isvsvn", 0xFFFF),
            tcb_date=level.date("tcbDate"),
            status=level.status("tcbStatus", allowed),
            advisory_ids=level.texts("advisoryIDs"),
        )
        for level in fields.objects("tcbLevels")
    )


def _module(fields: _Fields, with_levels: bool) -> TdxModuleIdentity:
    return TdxModuleIdentity(
        id=fields.text("id") if with_levels else "",
        mrsigner=fields.hexbytes("mrsigner", 48),
        attributes=fields.hexbytes("attributes", 8),
        attributes_mask=fields.hexbytes("attributesMask", 8),
        tcb_levels=_isv_levels(fields, _MODULE_STATUSES) if with_levels else (),
    )


def _ordered(levels: list[TcbLevel], tdx: bool) -> tuple[TcbLevel, ...]:
    """Highest first, as Intel's QVL keeps them (a set ordered by SVNs, not by the JSON)."""

    def key(level: TcbLevel) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
        return level.sgx_components, level.pce_svn, level.tdx_components if tdx else ()

    if len({key(level) for level in levels}) != len(levels):
        raise EvidenceError("TCB Info lists the same TCB level twice")
    return tuple(sorted(levels, key=key, reverse=True))


@lru_cache(maxsize=64)  # frozen results of a pure parse: one parse per published document
def parse_tcb_info(signed_body: bytes) -> TcbInfo:
    """The ``tcbInfo`` object (versions 2 and 3, SGX and TDX) from its signed bytes."""
    info = _Fields(load_json_object(signed_body, "tcbInfo"), "tcbInfo")
    version = info.integer("version")
    if version not in (2, 3):
        raise EvidenceError(f"TCB Info version {version} is not supported (2 or 3)")
    tcb_id = info.text("id") if version == 3 else "SGX"
    if tcb_id not in ("SGX", "TDX"):
        raise EvidenceError(f"TCB Info id {tcb_id!r} is neither SGX nor TDX")
    if info.integer("tcbType") != 0:
        raise EvidenceError("TCB Info tcbType is not 0, the only type defined")
    tdx = tcb_id == "TDX"
    if not tdx and (info.has("tdxModule") or info.has("tdxModuleIdentities")):
        raise EvidenceError("an SGX TCB Info carries TDX module fields")
    if tdx and not info.has("tdxModule"):
        raise EvidenceError("a TDX TCB Info has no tdxModule")
    identities = info.objects("tdxModuleIdentities") if info.has("tdxModuleIdentities") else []
    levels = [_tcb_level(level, version, tdx) for level in info.objects("tcbLevels")]
    return TcbInfo(
        id=tcb_id,
        version=version,
        issue_date=info.date("issueDate"),
        next_update=info.date("nextUpdate"),
        fmspc=info.hexbytes("fmspc", 6),
        pce_id=info.hexbytes("pceId", 2),
        tcb_evaluation_data_number=info.integer("tcbEvaluationDataNumber"),
        tcb_levels=_ordered(levels, tdx),
        tdx_module=_module(info.child("tdxModule"), with_levels=False) if tdx else None,
        tdx_module_identities=tuple(_module(item, with_levels=True) for item in identities),
    )


@lru_cache(maxsize=64)
def parse_qe_identity(signed_body: bytes) -> QeIdentity:
    """The ``enclaveIdentity`` object (versions 2 and 3) from its signed bytes."""
    identity = _Fields(load_json_object(signed_body, "enclaveIdentity"), "enclaveIdentity")
    version = identity.integer("version")
    if version not in (2, 3):
        raise EvidenceError(f"QE Identity version {version} is not supported (2 or 3)")
    return QeIdentity(
        id=identity.text("id"),
        version=version,
        issue_date=identity.date("issueDate"),
        next_update=identity.date("nextUpdate"),
        tcb_evaluation_data_number=identity.integer("tcbEvaluationDataNumber"),
        miscselect=identity.hexbytes("miscselect", 4),
        miscselect_mask=identity.hexbytes("miscselectMask", 4),
        attributes=identity.hexbytes("attributes", 16),
        attributes_mask=identity.hexbytes("attributesMask", 16),
        mrsigner=identity.hexbytes("mrsigner", 32),
        isvprodid=identity.integer("isvprodid", 0xFFFF),
        tcb_levels=_isv_levels(identity, _QE_STATUSES),
    )
