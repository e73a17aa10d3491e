"""Reference-value extractors: each turns one kind of provenance payload into values.

``sample``: the payload is standard base64 of a JSON object ``{name: value}`` (usually a list
of accepted values). Nothing is signed, so it trusts whoever may register values, which is the
admin API. Values expire after twelve months, as upstream's.

``swid``: the payload is standard base64 of a SWID tag with TCG RIM bindings (the reference
integrity manifest NVIDIA publishes for a GPU's firmware), as upstream's ``swid`` extractor
reads it: each ``Resource`` of type ``Measurement`` with at least one non-zero ``HashN``
attribute becomes ``<PlatformManufacturerStr>.<edition>.measurement_<index>`` (spaces and dashes
turned into underscores) whose value is the list of its hex digests. Like upstream's, it does
not check the manifest's signature: whoever may register values must have checked it. XML is
parsed with ``defusedxml`` (no entity expansion, no external resources), in bounded size.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from xml.etree.ElementTree import Element

import defusedxml.ElementTree
from defusedxml import DefusedXmlException

from keybroker.errors import BadRequestError
from keybroker.protocol.models import JsonValue
from keybroker.protocol.untrusted_json import parse_json
from keybroker.rvps.reference_value import ReferenceValue

VALIDITY_SECONDS = 365 * 24 * 3600
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def sample(payload: str, now: float) -> list[ReferenceValue]:
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError("the sample payload is not base64 of a JSON object") from None
    document = parse_json(raw, what="the sample payload")
    if not isinstance(document, dict):
        raise BadRequestError("the sample payload must be a JSON object {name: value}")
    values = []
    for name, value in document.items():
        if not _NAME.fullmatch(name):
            raise BadRequestError(f"invalid reference value name {name[:64]!r}")
        values.append(ReferenceValue(name=name, expiration=now + VALIDITY_SECONDS, value=value))
    return values


MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_MEASUREMENTS = 4096
MAX_HASHES = 64
_SWID = "{http://standards.iso.org/iso/19770/-2/2015/schema.xsd}"
_RIM = "{https://trustedcomputinggroup.org/resource/tcg-reference-integrity-manifest-rim-information-model/}"
_SHA384 = "{http://www.w3.org/2001/04/xmlenc#sha384}"
_HEX = re.compile(r"[0-9A-Fa-f]{1,256}")


def swid(payload: str, now: float) -> list[ReferenceValue]:
    if len(payload) > MAX_MANIFEST_BYTES * 4 // 3 + 4:
        raise BadRequestError(f"the swid manifest exceeds {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = base64.b64decode(payload, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadRequestError("the swid payload is not base64 of a UTF-8 XML manifest") from None
    try:
        root = defusedxml.ElementTree.fromstring(manifest, forbid_dtd=True)
    except (DefusedXmlException, SyntaxError) as e:  # ParseError is a SyntaxError
        raise BadRequestError(f"the swid manifest is not acceptable XML: {e}") from None
    meta = _first(root, "Meta", "meta information")
    manufacturer = _attribute(meta, f"{_RIM}PlatformManufacturerStr", "manufacturer information")
    edition = _attribute(meta, "edition", "edition information")
    prefix = f"{manufacturer.replace(' ', '_')}.{edition}"
    values = []
    measurements = [
        resource
        for resource in _first(root, "Payload", "SWID payload").iter(f"{_SWID}Resource")
        if resource.get("type") == "Measurement"
    ]
    if len(measurements) > MAX_MEASUREMENTS:
        raise BadRequestError(f"the swid manifest has more than {MAX_MEASUREMENTS} measurements")
    for resource in measurements:
        index = _attribute(resource, "index", "measurement name")
        digests = _digests(resource)
        if not digests:  # no measurement at this index (all hashes zero)
            continue
        # Rego identifiers take no dashes, so upstream's names have none.
        name = f"{prefix}.measurement_{index}".replace("-", "_")
        if not _NAME.fullmatch(name):
            raise BadRequestError(f"invalid reference value name {name[:64]!r}")
        values.append(ReferenceValue(name=name, expiration=now + VALIDITY_SECONDS, value=digests))
    return values


def _first(root: Element, tag: str, what: str) -> Element:
    found = root if root.tag == f"{_SWID}{tag}" else root.find(f".//{_SWID}{tag}")
    if found is None:
        raise BadRequestError(f"the swid manifest has no {what} ({tag})")
    return found


def _attribute(element: Element, name: str, what: str) -> str:
    value = element.get(name)
    if value is None:
        raise BadRequestError(f"the swid manifest has no {what}")
    return value


def _digests(resource: Element) -> list[JsonValue]:
    """The non-zero ``Hash0``, ``Hash1``... attributes, in order, up to the first missing one."""
    digests: list[JsonValue] = []
    for position in range(MAX_HASHES + 1):
        digest = resource.get(f"{_SHA384}Hash{position}")
        if digest is None:
            return digests
        if position == MAX_HASHES:
            raise BadRequestError(f"a swid measurement has more than {MAX_HASHES} hashes")
        if not _HEX.fullmatch(digest):
            raise BadRequestError("a swid measurement hash is not hexadecimal")
        if digest.strip("0"):
            digests.append(digest)
    return digests


EXTRACTORS: dict[str, Callable[[str, float], list[ReferenceValue]]] = {
    "sample": sample,
    "swid": swid,
}
