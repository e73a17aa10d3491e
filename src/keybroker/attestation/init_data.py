"""Init-data: the configuration a guest was launched with, bound into its evidence by digest.

``{"format": "toml" | "json", "body": "<text>"}``; the document is ``{version, algorithm,
data: {name: text}}``. The digest is ``algorithm`` (sha256/384/512) over the raw body text, as
the guest measured it. Claims are ``data``, with ``cdh.toml`` and ``aa.toml`` parsed into JSON,
and a ``policy.rego`` that declares ``policy_data := {...}`` replaced by that JSON as
``agent_policy_claims``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from keybroker.errors import BadRequestError
from keybroker.protocol.canonical import HashAlgorithm
from keybroker.protocol.models import InitData, JsonValue
from keybroker.protocol.untrusted_json import parse_json, parse_json_prefix, parse_toml

_TOML_CLAIMS = ("cdh.toml", "aa.toml")
_POLICY_DATA = "policy_data := {"


@dataclass(frozen=True)
class ParsedInitData:
    digest: bytes
    claims: JsonValue


def parse_init_data(init_data: InitData) -> ParsedInitData:
    document = _document(init_data)
    try:
        algorithm = HashAlgorithm.parse(str(document.get("algorithm", "")))
    except ValueError as e:
        raise BadRequestError(f"init-data algorithm: {e}") from None
    data = document.get("data", {})
    if not isinstance(data, dict):
        raise BadRequestError("init-data `data` must be a table of named documents")
    return ParsedInitData(algorithm.digest(init_data.body.encode()), _claims(data))


def _document(init_data: InitData) -> dict[str, JsonValue]:
    if init_data.format == "toml":
        return parse_toml(init_data.body, what="init-data")
    if init_data.format == "json":
        document = parse_json(init_data.body, what="init-data")
        if isinstance(document, dict):
            return document
        raise BadRequestError("JSON init-data must be an object")
    raise BadRequestError(f"init-data format must be toml or json, found {init_data.format[:16]!r}")


def _claims(data: dict[str, JsonValue]) -> dict[str, JsonValue]:
    claims = dict(data)
    for name in _TOML_CLAIMS:
        text = claims.get(name)
        if isinstance(text, str):
            # a document that does not parse (or nests too deep) is kept as text, as upstream
            # keeps one that does not parse
            with contextlib.suppress(BadRequestError):
                claims[name] = parse_toml(text, what=f"init-data {name}")
    policy = claims.get("policy.rego")
    if isinstance(policy, str):
        policy_data = agent_policy_data(policy)
        if policy_data is not None:
            del claims["policy.rego"]
            claims["agent_policy_claims"] = policy_data
    return claims


def agent_policy_data(rego: str) -> JsonValue | None:
    """The JSON object a Kata agent policy declares as ``policy_data``, if any."""
    start = rego.find(_POLICY_DATA)
    if start < 0:
        return None
    try:
        return parse_json_prefix(rego, start + len(_POLICY_DATA) - 1, what="policy_data")
    except BadRequestError:
        return None
