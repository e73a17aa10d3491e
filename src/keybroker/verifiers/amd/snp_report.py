"""AMD SEV-SNP attestation reports: the 0x4A0-byte binary, upstream's JSON form of it, claims.

Pure: bytes or JSON in, a frozen :class:`SnpReport` out; nothing here checks a signature (that
is :mod:`keybroker.verifiers.amd.snp`'s work). Layout per the SEV-SNP firmware ABI specification
(AMD 56860), table "ATTESTATION_REPORT Structure":

- version 2: no CPUID fields; version 3 (and 4): CPUID family, model and stepping at 0x188;
  version 5: also the launch and current mitigation vectors at 0x1F8 and 0x200;
- every TCB_VERSION is 8 bytes whose layout depends on the processor: Milan and Genoa put
  boot loader, TEE, SNP and microcode at bytes 0, 1, 6, 7; Turin puts FMC, boot loader, TEE and
  SNP at 0, 1, 2, 3 and microcode at 7. A version 3+ report names its processor (CPUID); for a
  version 2 report the Turin layout is recognised as Turin's shorter CHIP_ID (its last 56 bytes
  zero), as the ``sev`` crate does;
- the signature (ECDSA P-384 with SHA-384 for ``signature_algo`` 1) covers bytes 0..0x2A0; its
  r and s are stored little-endian, 72 bytes each.

Upstream's attester sends the report as JSON (the ``sev`` crate's serde form: every byte array
a list of numbers, TCB versions as objects). :func:`report_from_json` encodes that JSON back to
the exact binary layout, so the signature is checked over the bytes the firmware signed; a
JSON report that does not re-encode to the signed bytes simply fails the signature check.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
COMPONENT_SIZE = 72  # r and s are each stored in 72 little-endian bytes
MIN_VERSION = 2
MAX_VERSION = 5
ECDSA_P384_SHA384 = 1
SIGNING_KEY_VCEK = 0
SIGNING_KEY_VLEK = 1

# GUEST_POLICY bits (ABI spec, table "Guest Policy Structure")
_POLICY_SMT_ALLOWED = 16
_POLICY_MIGRATE_MA = 18
_POLICY_DEBUG = 19
_POLICY_SINGLE_SOCKET = 20
# PLATFORM_INFO bits
_PLATFORM_SMT_ENABLED = 0
_PLATFORM_TSME_ENABLED = 1


class Product(StrEnum):
    """The EPYC generations AMD's KDS serves, spelled as its URLs spell them."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"


def product_of_cpuid(family: int, model: int) -> Product:
    """The processor generation a version 3+ report's CPUID family and model name."""
    if family == 0x19:
        if model <= 0x0F:
            return Product.MILAN
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return Product.GENOA
    elif family == 0x1A and model <= 0x11:
        return Product.TURIN
    raise EvidenceError(
        f"the SNP report's CPUID family 0x{family:02x} model 0x{model:02x} is not a known "
        "SEV-SNP processor (Milan, Genoa or Turin)"
    )


@dataclass(frozen=True)
class TcbVersion:
    """One TCB_VERSION: security version numbers of the firmware components. ``fmc`` is
    Turin's (and later processors') FMC SVN, None in the Milan/Genoa layout."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: bytes, turin: bool) -> TcbVersion:
        if turin:
            return cls(bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def encode(self, turin: bool) -> bytes:
        if turin:
            return bytes(
                [self.fmc or 0, self.bootloader, self.tee, self.snp, 0, 0, 0, self.microcode]
            )
        return bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])


@dataclass(frozen=True)
class FirmwareVersion:
    major: int
    minor: int
    build: int


@dataclass(frozen=True)
class SnpReport:
    """A parsed, *unverified* SNP attestation report. ``raw`` is the full 0x4A0-byte report;
    ``signed`` the bytes its signature covers."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    key_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None  # version 3+
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current: FirmwareVersion
    committed: FirmwareVersion
    launch_tcb: TcbVersion
    launch_mit_vector: int | None  # version 5+
    current_mit_vector: int | None
    signature_r: bytes  # 72 bytes, little-endian
    signature_s: bytes
    raw: bytes

    @property
    def signed(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def signing_key(self) -> int:
        """KEY_INFO.SIGNING_KEY: 0 VCEK, 1 VLEK, 7 none."""
        return self.key_info >> 2 & 0b111

    @property
    def product(self) -> Product | None:
        """The processor the report names (version 3+); None for a version 2 report."""
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return product_of_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    @property
    def turin_layout(self) -> bool:
        return self.reported_tcb.fmc is not None

    def hwid(self) -> bytes:
        """The hardware id KDS files this chip's VCEKs under: CHIP_ID, of which Turin uses
        only the first 8 bytes."""
        return self.chip_id[:8] if self.turin_layout else self.chip_id


def _turin_layout(version: int, data: bytes) -> bool:
    """Whether the TCB_VERSION fields of this report use Turin's layout."""
    if version >= 3:
        return product_of_cpuid(data[0x188], data[0x189]) is Product.TURIN
    chip_id = data[0x1A0:0x1E0]
    if chip_id == bytes(64):
        raise EvidenceError(
            "the version 2 SNP report's CHIP_ID is masked, so its processor generation (and the "
            "layout of its TCB versions) cannot be told"
        )
    return chip_id[8:] == bytes(56)


def parse_report(raw: bytes) -> SnpReport:
    """Parse the binary attestation report (exactly 0x4A0 bytes, version 2 to 5)."""
    if len(raw) != REPORT_SIZE:
        raise EvidenceError(f"an SNP report is {REPORT_SIZE} bytes, not {len(raw)}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0)
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise EvidenceError(
            f"SNP report version {version} is not supported (versions {MIN_VERSION} to "
            f"{MAX_VERSION} are)"
        )
    turin = _turin_layout(version, raw)
    vmpl, signature_algo = struct.unpack_from("<II", raw, 0x30)
    platform_info, key_info = struct.unpack_from("<QI", raw, 0x40)
    v3 = version >= 3
    v5 = version >= 5

    def tcb(offset: int) -> TcbVersion:
        return TcbVersion.decode(raw[offset : offset + 8], turin)

    def firmware(offset: int) -> FirmwareVersion:
        return FirmwareVersion(major=raw[offset + 2], minor=raw[offset + 1], build=raw[offset])

    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=tcb(0x38),
        platform_info=platform_info,
        key_info=key_info,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        report_id_ma=raw[0x160:0x180],
        reported_tcb=tcb(0x180),
        cpuid_fam_id=raw[0x188] if v3 else None,
        cpuid_mod_id=raw[0x189] if v3 else None,
        cpuid_step=raw[0x18A] if v3 else None,
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=tcb(0x1E0),
        current=firmware(0x1E8),
        committed=firmware(0x1EC),
        launch_tcb=tcb(0x1F0),
        launch_mit_vector=struct.unpack_from("<Q", raw, 0x1F8)[0] if v5 else None,
        current_mit_vector=struct.unpack_from("<Q", raw, 0x200)[0] if v5 else None,
        signature_r=raw[0x2A0 : 0x2A0 + COMPONENT_SIZE],
        signature_s=raw[0x2A0 + COMPONENT_SIZE : 0x2A0 + 2 * COMPONENT_SIZE],
        raw=bytes(raw),
    )


# --- upstream's JSON form (the sev crate's serde encoding) ----------------------------------

_U8 = Annotated[int, Field(ge=0, le=0xFF, strict=True)]
_U32 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF, strict=True)]
_U64 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF_FFFF_FFFF, strict=True)]


_B16 = Annotated[list[_U8], Field(min_length=16, max_length=16)]
_B32 = Annotated[list[_U8], Field(min_length=32, max_length=32)]
_B48 = Annotated[list[_U8], Field(min_length=48, max_length=48)]
_B64 = Annotated[list[_U8], Field(min_length=64, max_length=64)]
_B72 = Annotated[list[_U8], Field(min_length=72, max_length=72)]


class _Json(BaseModel):
    # serde ignores fields it does not know; whatever they would change is signed, so a report
    # that relies on one fails the signature check
    model_config = ConfigDict(extra="ignore", frozen=True)


class _TcbJson(_Json):
    fmc: _U8 | None = None
    bootloader: _U8
    tee: _U8
    snp: _U8
    microcode: _U8


class _VersionJson(_Json):
    major: _U8
    minor: _U8
    build: _U8


class _SignatureJson(_Json):
    r: _B72
    s: _B72


class _ReportJson(_Json):
    version: _U32
    guest_svn: _U32
    policy: _U64
    family_id: _B16
    image_id: _B16
    vmpl: _U32
    sig_algo: _U32
    current_tcb: _TcbJson
    plat_info: _U64
    key_info: _U32
    report_data: _B64
    measurement: _B48
    host_data: _B32
    id_key_digest: _B48
    author_key_digest: _B48
    report_id: _B32
    report_id_ma: _B32
    reported_tcb: _TcbJson
    cpuid_fam_id: _U8 | None = None
    cpuid_mod_id: _U8 | None = None
    cpuid_step: _U8 | None = None
    chip_id: _B64
    committed_tcb: _TcbJson
    current: _VersionJson
    committed: _VersionJson
    launch_tcb: _TcbJson
    launch_mit_vector: _U64 | None = None
    current_mit_vector: _U64 | None = None
    signature: _SignatureJson


def _tcb_bytes(tcb: _TcbJson, turin: bool) -> bytes:
    return TcbVersion(tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode, tcb.fmc).encode(turin)


def _version_bytes(version: _VersionJson) -> bytes:
    return bytes([version.build, version.minor, version.major, 0])


def encode_report(report: _ReportJson) -> bytes:
    """The binary report the JSON describes, reserved bytes zero, as the ``sev`` crate writes
    it before checking a signature."""
    out = bytearray(REPORT_SIZE)
    struct.pack_into("<IIQ", out, 0, report.version, report.guest_svn, report.policy)
    out[0x10:0x20] = bytes(report.family_id)
    out[0x20:0x30] = bytes(report.image_id)
    struct.pack_into("<II", out, 0x30, report.vmpl, report.sig_algo)
    struct.pack_into("<QI", out, 0x40, report.plat_info, report.key_info)
    out[0x50:0x90] = bytes(report.report_data)
    out[0x90:0xC0] = bytes(report.measurement)
    out[0xC0:0xE0] = bytes(report.host_data)
    out[0xE0:0x110] = bytes(report.id_key_digest)
    out[0x110:0x140] = bytes(report.author_key_digest)
    out[0x140:0x160] = bytes(report.report_id)
    out[0x160:0x180] = bytes(report.report_id_ma)
    if report.version >= 3:
        out[0x188] = report.cpuid_fam_id or 0
        out[0x189] = report.cpuid_mod_id or 0
        out[0x18A] = report.cpuid_step or 0
    out[0x1A0:0x1E0] = bytes(report.chip_id)
    if not MIN_VERSION <= report.version <= MAX_VERSION:
        raise EvidenceError(f"SNP report version {report.version} is not supported")
    turin = _turin_layout(report.version, bytes(out))
    out[0x38:0x40] = _tcb_bytes(report.current_tcb, turin)
    out[0x180:0x188] = _tcb_bytes(report.reported_tcb, turin)
    out[0x1E0:0x1E8] = _tcb_bytes(report.committed_tcb, turin)
    out[0x1E8:0x1EC] = _version_bytes(report.current)
    out[0x1EC:0x1F0] = _version_bytes(report.committed)
    out[0x1F0:0x1F8] = _tcb_bytes(report.launch_tcb, turin)
    if report.version >= 5:
        struct.pack_into(
            "<QQ",
            out,
            0x1F8,
            report.launch_mit_vector or 0,
            report.current_mit_vector or 0,
        )
    out[0x2A0 : 0x2A0 + COMPONENT_SIZE] = bytes(report.signature.r)
    out[0x2A0 + COMPONENT_SIZE : 0x2A0 + 2 * COMPONENT_SIZE] = bytes(report.signature.s)
    return bytes(out)


def report_from_json(unverified: JsonValue) -> SnpReport:
    """Parse upstream's JSON ``attestation_report`` by re-encoding it to the binary layout."""
    try:
        model = _ReportJson.model_validate(unverified)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise EvidenceError(
            f"the SNP evidence's attestation_report is malformed at {where or 'top'}: "
            f"{first['msg']}"
        ) from None
    return parse_report(encode_report(model))


# --- claims ------------------------------------------------------------------------------------


def _bit(value: int, bit: int) -> bool:
    return bool(value >> bit & 1)


def snp_claims(report: SnpReport) -> dict[str, JsonValue]:
    """Upstream Trustee's SNP claims, with its names and encodings: policy and platform flags
    as booleans, ABI versions and reported TCB SVNs as numbers, byte strings as lowercase hex
    (``init_data`` is HOST_DATA)."""
    policy, platform = report.policy, report.platform_info
    tcb = report.reported_tcb
    return {
        "policy_abi_major": policy >> 8 & 0xFF,
        "policy_abi_minor": policy & 0xFF,
        "policy_smt_allowed": _bit(policy, _POLICY_SMT_ALLOWED),
        "policy_migrate_ma": _bit(policy, _POLICY_MIGRATE_MA),
        "policy_debug_allowed": _bit(policy, _POLICY_DEBUG),
        "policy_single_socket": _bit(policy, _POLICY_SINGLE_SOCKET),
        "reported_tcb_bootloader": tcb.bootloader,
        "reported_tcb_tee": tcb.tee,
        "reported_tcb_snp": tcb.snp,
        "reported_tcb_microcode": tcb.microcode,
        "platform_tsme_enabled": _bit(platform, _PLATFORM_TSME_ENABLED),
        "platform_smt_enabled": _bit(platform, _PLATFORM_SMT_ENABLED),
        "measurement": report.measurement.hex(),
        "report_data": report.report_data.hex(),
        "init_data": report.host_data.hex(),
        "chip_id": report.chip_id.hex(),
    }
