"""Reference-value extractors: each turns one kind of provenance payload into values.

``sample``: the payload is standard base64 of a JSON object ``{name: value}`` (usually a list
of accepted values). Nothing is signed, so it trusts whoever may register values, which is the
admin API. Values expire after twelve months, as upstream's.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

from keybroker.errors import BadRequestError
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


EXTRACTORS: dict[str, Callable[[str, float], list[ReferenceValue]]] = {"sample": sample}
