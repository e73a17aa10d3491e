"""The KBS API's OpenAPI 3.1 document: ``openapi.yaml`` next to this module, served as JSON.

The document is written by hand (it is a contract, read by people writing clients) and kept
in step with the code by ``tests/unit/kbs/test_openapi.py``: every route it names is served,
every served route is in it, and its schemas for the wire models agree with the pydantic models
that parse them. This module only loads it; it does not generate or validate anything.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

import yaml

SPEC_NAME = "openapi.json"  # served at /kbs/v0/openapi.json


@cache
def document() -> dict[str, Any]:
    """The document as loaded (YAML anchors expanded, the anchors' own holder removed)."""
    text = files("keybroker.kbs").joinpath("openapi.yaml").read_text(encoding="utf-8")
    loaded: dict[str, Any] = yaml.safe_load(text)
    loaded.pop("x-shared-responses", None)
    return loaded


@cache
def document_json() -> bytes:
    return json.dumps(document(), separators=(",", ":")).encode()
