"""Hygon's structures in their serde JSON form, turned back into the firmware's bytes.

Upstream's attesters send the ``csv-rs`` crate's structures as serde JSON: a byte array as a
list of integers, an integer as a number, a nested structure as an object. The signatures are
over the binary layout, so the verifiers rebuild it exactly: every field present, no unknown
field, every list of the exact length, every integer in range. What comes out is then parsed
once, by offset, from bytes (:mod:`keybroker.verifiers.hygon.certs`, ``csv_report``, ``dcu``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from keybroker.errors import EvidenceError
from keybroker.protocol.models import JsonValue


@dataclass(frozen=True)
class Int:
    size: int  # bytes, little endian


@dataclass(frozen=True)
class Bytes:
    size: int


@dataclass(frozen=True)
class Array:
    count: int
    item: Layout


Field = tuple[str, "Layout"]
Layout = Int | Bytes | Array | Sequence[Field]

U8, U16, U32 = Int(1), Int(2), Int(4)


def size_of(layout: Layout) -> int:
    if isinstance(layout, Int | Bytes):
        return layout.size
    if isinstance(layout, Array):
        return layout.count * size_of(layout.item)
    return sum(size_of(item) for _, item in layout)


def encode(layout: Layout, unverified: JsonValue, what: str) -> bytes:
    """The bytes ``unverified`` stands for, or :class:`EvidenceError` naming the bad field."""
    if isinstance(layout, Int):
        if type(unverified) is not int or not 0 <= unverified < 1 << (8 * layout.size):
            raise EvidenceError(f"{what} must be an integer of {layout.size} bytes")
        return unverified.to_bytes(layout.size, "little")
    if isinstance(layout, Bytes):
        if (
            not isinstance(unverified, list)
            or len(unverified) != layout.size
            or not all(type(b) is int and 0 <= b < 256 for b in unverified)
        ):
            raise EvidenceError(f"{what} must be a list of {layout.size} bytes")
        return bytes(unverified)  # checked above: ints 0..255
    if isinstance(layout, Array):
        if not isinstance(unverified, list) or len(unverified) != layout.count:
            raise EvidenceError(f"{what} must be a list of {layout.count} entries")
        return b"".join(
            encode(layout.item, item, f"{what}[{i}]") for i, item in enumerate(unverified)
        )
    if not isinstance(unverified, dict):
        raise EvidenceError(f"{what} must be an object")
    names = [name for name, _ in layout]
    if sorted(unverified) != sorted(names):
        raise EvidenceError(f"{what} must have exactly the fields {', '.join(names)}")
    return b"".join(encode(item, unverified[name], f"{what}.{name}") for name, item in layout)
