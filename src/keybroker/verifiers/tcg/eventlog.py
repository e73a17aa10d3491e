"""The Confidential Computing event log (CCEL) of a TDX guest: parse it, replay it into RTMRs.

The log is the one the guest's firmware keeps in the ACPI CCEL table, in the TCG "crypto agile"
format (TCG PC Client Platform Firmware Profile 1.06, section 10): a first event in the old
SHA-1 layout whose data is the spec-ID event (``Spec ID Event03``: which digest algorithms the
log uses and their sizes), then ``TCG_PCR_EVENT2`` records (register index, event type, digest
count, one digest per algorithm, event data). Eight bytes of ``0xFF`` or ``0x00`` where the next
record would start end the log; firmware pads the table with them.

What this module does, pure (bytes in, frozen values out; ``EvidenceError`` on any refusal):

* :func:`parse_event_log` reads an ``unverified`` log into :class:`EventLog`, refusing
  malformed or oversized input (limits below: log size, event data size, event count, digests
  per event). The register index is kept as logged: 0 is MRTD, 1 to 4 are RTMR0 to RTMR3
  (UEFI 2.10, section 38.4.3).
* :func:`uefi_event_logs` renders the events as upstream Trustee's ``uefi_event_logs`` claim,
  field for field (see ``eventlog_details`` for the per-type ``details``).
* :func:`replay_rtmrs` and :func:`verify_against_rtmrs` recompute RTMR0-3 from the SHA-384
  digests and compare them with a quote's; :func:`replay_registers` is the same replay for
  other digests and register counts (Hygon CSV logs use SM3).
* :func:`replay_pcrs` replays a TPM's TCG2 log (``binary_bios_measurements``) into PCRs, as a
  TPM extends them: EV_NO_ACTION events are not extended, PCR 0 may start at a locality.

The spec-ID signature is not checked, and records after the end marker are ignored, as
upstream does; the stricter checks upstream lacks are named where they are made.

What it does not do: trust anything in the log before :func:`verify_against_rtmrs` has bound it
to RTMRs of a verified quote. ``digest_matches_event`` and ``details`` are upstream's
informational views: a digest is what was extended, the event data only describes it.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue
from keybroker.verifiers.tcg.eventlog_details import (
    EV_NO_ACTION,
    EVENT_TYPE_NAMES,
    EventDetails,
    event_details,
)

# Limits: a CCEL table is 64 KiB to 1 MiB in practice; the largest events are certificate
# databases of a few KiB. Anything far beyond is an attempt to exhaust memory or CPU.
MAX_LOG_SIZE = 16 * 1024 * 1024
MAX_EVENT_DATA_SIZE = 1024 * 1024
MAX_DIGESTS = 8
# Real logs hold tens to a few thousand events; a 16 MiB log of empty 16-byte records would
# hold a million and cost seconds of CPU per request.
MAX_EVENTS = 65536
SPEC_ID_HEADER_SIZE = 24  # signature[16], platform class, spec version, errata, uintn size
SHA1_SIZE = 20
RTMR_COUNT = 4
RTMR_SIZE = 48
RTMR_ALGORITHM = "SHA-384"
PCR_COUNT = 24  # a PC client TPM's PCRs
# TCG PC Client PFP 10.4.5.3: EV_NO_ACTION data naming the locality TPM2_Startup ran at
STARTUP_LOCALITY = b"StartupLocality\x00"
END_MARKERS = (b"\xff" * 8, b"\x00" * 8)

# TPM_ALG_ID -> (name, digest size); names as upstream writes them in claims
DIGEST_ALGORITHMS: dict[int, tuple[str, int]] = {
    0x0004: ("SHA-1", 20),
    0x000B: ("SHA-256", 32),
    0x000C: ("SHA-384", 48),
    0x000D: ("SHA-512", 64),
    0x0012: ("SM3", 32),
}
# Algorithms whose event digests can be checked. SHA-1 is declared by some logs but, as
# upstream, an event carrying a SHA-1 digest is refused rather than half-checked.
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "SHA-256": hashes.SHA256,
    "SHA-384": hashes.SHA384,
    "SHA-512": hashes.SHA512,
    "SM3": hashes.SM3,
}

__all__ = [
    "MAX_DIGESTS",
    "MAX_EVENTS",
    "MAX_EVENT_DATA_SIZE",
    "MAX_LOG_SIZE",
    "Event",
    "EventDetails",
    "EventDigest",
    "EventLog",
    "parse_event_log",
    "replay_pcrs",
    "replay_registers",
    "replay_rtmrs",
    "uefi_event_logs",
    "verify_against_rtmrs",
]


@dataclass(frozen=True)
class EventDigest:
    algorithm: str  # "SHA-384", ...
    digest: bytes


@dataclass(frozen=True)
class Event:
    mr_index: int  # as logged: 0 MRTD, 1-4 RTMR0-3
    event_type: int
    digests: tuple[EventDigest, ...]
    data: bytes
    details: EventDetails
    digest_matches_event: bool  # every digest is the hash of ``data`` (informational)

    @property
    def type_name(self) -> str:
        return EVENT_TYPE_NAMES[self.event_type]

    def digest(self, algorithm: str) -> bytes | None:
        return next((d.digest for d in self.digests if d.algorithm == algorithm), None)

    def to_json(self) -> dict[str, JsonValue]:
        """One entry of upstream's ``uefi_event_logs``."""
        return {
            "details": self.details.to_json(),
            "digest_matches_event": self.digest_matches_event,
            "digests": [{"alg": d.algorithm, "digest": d.digest.hex()} for d in self.digests],
            "event": base64.b64encode(self.data).decode("ascii"),
            "index": self.mr_index,
            "type_name": self.type_name,
        }


@dataclass(frozen=True)
class EventLog:
    algorithms: tuple[str, ...]  # declared by the spec-ID event, in its order
    events: tuple[Event, ...]  # the spec-ID event itself is not one of them, as upstream


class _Cursor:
    """Bounds-checked little-endian reads; every read names what it reads."""

    def __init__(self, data: bytes, name: str) -> None:
        self._data, self._name, self.offset = data, name, 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self.offset

    def peek(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            raise EvidenceError(
                f"{self._name} is truncated: {what} needs {size} bytes at offset "
                f"{self.offset:#x}, {self.remaining} remain"
            )
        return self._data[self.offset : self.offset + size]

    def take(self, size: int, what: str) -> bytes:
        chunk = self.peek(size, what)
        self.offset += size
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


def parse_event_log(unverified_log: bytes) -> EventLog:
    """Parse a CCEL / TCG2 crypto-agile event log; refuse it whole if any record is malformed."""
    if len(unverified_log) > MAX_LOG_SIZE:
        raise EvidenceError(
            f"the event log is {len(unverified_log)} bytes; at most {MAX_LOG_SIZE} are accepted"
        )
    cursor = _Cursor(unverified_log, "the event log")
    sizes = _spec_id_event(cursor)
    events: list[Event] = []
    # every record consumes at least 16 bytes, so this loop ends
    while cursor.remaining and cursor.peek(8, "an event header") not in END_MARKERS:
        if len(events) == MAX_EVENTS:
            raise EvidenceError(f"the event log has more than {MAX_EVENTS} events")
        events.append(_event(cursor, sizes, len(events)))
    names = tuple(DIGEST_ALGORITHMS[alg][0] for alg in sizes)
    return EventLog(algorithms=names, events=tuple(events))


def _event_data_size(cursor: _Cursor, what: str) -> int:
    size = cursor.u32(f"{what} size")
    if size > MAX_EVENT_DATA_SIZE:
        raise EvidenceError(
            f"{what} is {size} bytes; at most {MAX_EVENT_DATA_SIZE} are accepted per event"
        )
    return size


def _spec_id_event(cursor: _Cursor) -> dict[int, int]:
    """The first record (TCG_PCClientPCREvent): which digest algorithms the log uses."""
    cursor.u32("the spec-ID event's register index")
    event_type = cursor.u32("the spec-ID event's type")
    if event_type != EV_NO_ACTION:
        raise EvidenceError(
            "the event log must start with a spec-ID event of type EV_NO_ACTION (3); "
            f"found type {event_type:#x}"
        )
    cursor.take(SHA1_SIZE, "the spec-ID event's SHA-1 digest")
    size = _event_data_size(cursor, "the spec-ID event data")
    return _digest_sizes(cursor.take(size, "the spec-ID event data"))


def _digest_sizes(unverified_spec: bytes) -> dict[int, int]:
    """TCG_EfiSpecIdEvent: signature, platform class, versions, uintn size, algorithms, vendor."""
    spec = _Cursor(unverified_spec, "the spec-ID event")
    # The signature ("Spec ID Event03") is not required: the logs Attestation Agent writes for
    # Hygon CSV guests leave it zeroed and upstream reads them. The algorithm list decides.
    spec.take(SPEC_ID_HEADER_SIZE, "its signature, platform class and versions")
    count = spec.u32("its algorithm count")
    if not 1 <= count <= MAX_DIGESTS:
        raise EvidenceError(f"the spec-ID event declares {count} algorithms; expected 1 to 8")
    sizes: dict[int, int] = {}
    for _ in range(count):
        algorithm, size = spec.u16("an algorithm id"), spec.u16("a digest size")
        _check_declared_algorithm(algorithm, size, sizes)
        sizes[algorithm] = size
    spec.take(spec.u8("its vendor info size"), "its vendor info")
    if spec.remaining:
        raise EvidenceError(f"the spec-ID event has {spec.remaining} bytes after its vendor info")
    return sizes


def _check_declared_algorithm(algorithm: int, size: int, declared: dict[int, int]) -> None:
    known = DIGEST_ALGORITHMS.get(algorithm)
    if known is None:
        raise EvidenceError(f"the spec-ID event declares unknown algorithm id {algorithm:#06x}")
    name, expected = known
    if size != expected:
        raise EvidenceError(
            f"the spec-ID event declares {name} digests of {size} bytes; {name} has {expected}"
        )
    if algorithm in declared:
        raise EvidenceError(f"the spec-ID event declares {name} twice")


def _event(cursor: _Cursor, sizes: dict[int, int], number: int) -> Event:
    """One TCG_PCR_EVENT2 record."""
    start = cursor.offset
    mr_index = cursor.u32("an event's register index")
    event_type = cursor.u32("an event's type")
    label = f"event {number} at offset {start:#x}"
    if event_type not in EVENT_TYPE_NAMES:
        raise EvidenceError(f"{label} has unknown event type {event_type:#x}")
    digests = _digests(cursor, sizes, label)
    data = cursor.take(_event_data_size(cursor, f"{label} data"), f"{label} data")
    label = f"{label} ({EVENT_TYPE_NAMES[event_type]})"
    try:
        matches = _digests_match(data, digests)
        details = event_details(event_type, data)
    except EvidenceError as e:
        raise EvidenceError(f"{label}: {e.detail}") from e
    return Event(mr_index, event_type, digests, data, details, matches)


def _digests(cursor: _Cursor, sizes: dict[int, int], label: str) -> tuple[EventDigest, ...]:
    """TPML_DIGEST_VALUES: a count, then (algorithm id, digest) pairs in declared sizes."""
    count = cursor.u32(f"{label} digest count")
    if count > MAX_DIGESTS:
        raise EvidenceError(f"{label} has {count} digests; at most {MAX_DIGESTS} are accepted")
    digests: list[EventDigest] = []
    for _ in range(count):
        algorithm = cursor.u16(f"{label} digest algorithm")
        if algorithm not in sizes:
            raise EvidenceError(
                f"{label} has a digest of algorithm {algorithm:#06x}, which the spec-ID event "
                "does not declare"
            )
        name = DIGEST_ALGORITHMS[algorithm][0]
        # one digest per bank: a second one could be replayed while the first is shown
        if any(d.algorithm == name for d in digests):
            raise EvidenceError(f"{label} has two {name} digests")
        digests.append(EventDigest(name, cursor.take(sizes[algorithm], f"{label} {name} digest")))
    return tuple(digests)


def _digests_match(data: bytes, digests: tuple[EventDigest, ...]) -> bool:
    for digest in digests:
        algorithm = _HASHES.get(digest.algorithm)
        if algorithm is None:
            raise EvidenceError(f"{digest.algorithm} event digests are not supported")
        if _hash(algorithm, data) != digest.digest:
            return False
    return True


def _hash(algorithm: Callable[[], hashes.HashAlgorithm], data: bytes) -> bytes:
    hasher = hashes.Hash(algorithm())
    hasher.update(data)
    return hasher.finalize()


def uefi_event_logs(events: Sequence[Event]) -> list[dict[str, JsonValue]]:
    """The events as upstream Trustee's ``uefi_event_logs`` claim."""
    return [event.to_json() for event in events]


def replay_registers(events: Sequence[Event], algorithm: str, count: int) -> list[bytes]:
    """Registers 1 to ``count`` as the events extend them: ``mr = H(mr || digest)`` from zero.

    As upstream, every event logged at index 1 to ``count`` is extended with its ``algorithm``
    digest, whatever its type (EV_NO_ACTION included: a log whose firmware did not extend one
    fails closed). Index 0 is skipped: on TDX it is MRTD, which the TDX module measures itself.
    Unlike upstream, an event at index 1 to ``count`` without an ``algorithm`` digest, or at an
    index beyond ``count``, is refused: it would reach the claims bound to no register.
    """
    hash_algorithm = _HASHES.get(algorithm)
    if hash_algorithm is None:
        raise EvidenceError(f"cannot replay {algorithm} registers")
    registers = [bytes(hash_algorithm().digest_size)] * count
    for number, event in enumerate(events):
        if event.mr_index == 0:
            continue
        label = f"event {number} ({event.type_name}) at register index {event.mr_index}"
        if event.mr_index > count:
            raise EvidenceError(f"{label}: only indexes 0 to {count} are measurement registers")
        digest = event.digest(algorithm)
        if digest is None:
            raise EvidenceError(f"{label} has no {algorithm} digest to replay")
        slot = event.mr_index - 1
        registers[slot] = _hash(hash_algorithm, registers[slot] + digest)
    return registers


def replay_rtmrs(events: Sequence[Event]) -> list[bytes]:
    """TDX RTMR0-3 (event log indexes 1-4) replayed from the events' SHA-384 digests."""
    return replay_registers(events, RTMR_ALGORITHM, RTMR_COUNT)


def verify_against_rtmrs(events: Sequence[Event], rtmrs: tuple[bytes, bytes, bytes, bytes]) -> None:
    """Refuse the log unless its replay equals the quote's RTMR0-3, naming the first mismatch."""
    if len(rtmrs) != RTMR_COUNT or any(len(rtmr) != RTMR_SIZE for rtmr in rtmrs):
        raise EvidenceError(f"expected {RTMR_COUNT} RTMRs of {RTMR_SIZE} bytes from the quote")
    for register, (replayed, quoted) in enumerate(zip(replay_rtmrs(events), rtmrs, strict=True)):
        if replayed != quoted:
            raise EvidenceError(
                f"the event log does not replay to RTMR{register} (event log index "
                f"{register + 1}): replayed {replayed.hex()}, the quote has {quoted.hex()}"
            )


def replay_pcrs(events: Sequence[Event], algorithm: str) -> dict[int, bytes]:
    """The PCRs a TPM's TCG2 event log extends, replayed from its ``algorithm`` digests.

    Unlike :func:`replay_registers` (CCEL, where upstream extends every event), this follows
    the TPM: EV_NO_ACTION events are never extended, and a StartupLocality event, before any
    PCR 0 extension, makes PCR 0 start at its locality instead of zeros (PC Client PFP 10.4.5.3).
    Only the PCRs the log touches are returned. An extended event without an ``algorithm``
    digest, or at an index that is not a PCR, is refused.
    """
    hash_algorithm = _HASHES.get(algorithm)
    if hash_algorithm is None:
        raise EvidenceError(f"cannot replay {algorithm} PCRs")
    zeros = bytes(hash_algorithm().digest_size)
    pcrs: dict[int, bytes] = {}
    for number, event in enumerate(events):
        label = f"event {number} ({event.type_name}) at PCR {event.mr_index}"
        if event.event_type == EV_NO_ACTION:
            if event.data.startswith(STARTUP_LOCALITY):
                if event.mr_index != 0 or 0 in pcrs or len(event.data) != 17:
                    raise EvidenceError(f"{label}: a StartupLocality event out of place")
                pcrs[0] = zeros[:-1] + event.data[16:17]
            continue
        if event.mr_index >= PCR_COUNT:
            raise EvidenceError(f"{label}: a TPM has PCRs 0 to {PCR_COUNT - 1}")
        digest = event.digest(algorithm)
        if digest is None:
            raise EvidenceError(f"{label} has no {algorithm} digest to replay")
        pcrs[event.mr_index] = _hash(hash_algorithm, pcrs.get(event.mr_index, zeros) + digest)
    return pcrs
