"""The ``swid`` reference-value extractor on upstream's RIM (an NVIDIA H100 GPU's firmware), and
the manifests it must refuse."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from conftest import vector
from keybroker.errors import BadRequestError
from keybroker.rvps.extractors import MAX_HASHES, swid
from keybroker.rvps.store import ReferenceValueStore
from keybroker.storage.memory import MemoryKeyValueStorage

# upstream's own check on this manifest (rvps/src/extractors/swid/mod.rs)
MEASUREMENT_12 = (
    "758af96044c700f98a85347be27124d51c05b8784ba216b6"
    "29b9aaab6d538c759aed9922a133e4ac473564d359b271d5"
)
SWID = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
RIM = (
    "https://trustedcomputinggroup.org/resource/"
    "tcg-reference-integrity-manifest-rim-information-model/"
)
SHA384 = "http://www.w3.org/2001/04/xmlenc#sha384"


def _upstream_rim() -> str:
    return vector("rvps", "swid", "test-rim.b64").read_text().strip()


def _manifest(resources: str, *, meta: str | None = None, prolog: str = "") -> str:
    meta = (
        meta if meta is not None else '<Meta edition="GPU" r:PlatformManufacturerStr="Acme Inc"/>'
    )
    xml = (
        f'{prolog}<SoftwareIdentity xmlns="{SWID}" xmlns:r="{RIM}" xmlns:h="{SHA384}">'
        f"{meta}<Payload>{resources}</Payload></SoftwareIdentity>"
    )
    return base64.b64encode(xml.encode()).decode()


def test_upstream_rim_yields_upstream_measurement_12() -> None:
    values = {value.name: value.value for value in swid(_upstream_rim(), now=0.0)}
    measurement = values["NVIDIA_Corporation.GPU.measurement_12"]
    assert isinstance(measurement, list) and measurement[0] == MEASUREMENT_12
    # index 0 of the manifest is all zeros: no measurement there, so no value
    assert "NVIDIA_Corporation.GPU.measurement_0" not in values
    assert all(name.startswith("NVIDIA_Corporation.GPU.measurement_") for name in values)


def test_swid_values_are_registered_and_queried_through_the_store() -> None:
    store = ReferenceValueStore(MemoryKeyValueStorage(), clock=lambda: 1000.0)
    message = json.dumps({"version": "0.1.0", "type": "swid", "payload": _upstream_rim()})
    names = asyncio.run(store.register(message))
    assert "NVIDIA_Corporation.GPU.measurement_12" in names
    queried = asyncio.run(store.query("NVIDIA_Corporation.GPU.measurement_12"))
    assert isinstance(queried, list) and MEASUREMENT_12 in queried


def test_dashes_and_spaces_become_underscores() -> None:
    payload = _manifest(
        f'<Resource type="Measurement" index="a-1" h:Hash0="{"ab" * 48}" h:Hash1="{"0" * 96}"/>'
        '<Resource type="File" index="9" h:Hash0="ff"/>'
    )
    values = swid(payload, now=0.0)
    assert [(value.name, value.value) for value in values] == [
        ("Acme_Inc.GPU.measurement_a_1", ["ab" * 48])
    ]


def test_entity_expansion_is_refused() -> None:
    prolog = '<!DOCTYPE s [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    with pytest.raises(BadRequestError, match="not acceptable XML"):
        swid(_manifest("", prolog=prolog), now=0.0)


def test_external_entity_is_refused() -> None:
    prolog = '<!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    with pytest.raises(BadRequestError, match="not acceptable XML"):
        swid(_manifest("&x;", prolog=prolog), now=0.0)


def test_manifest_without_manufacturer_is_refused() -> None:
    with pytest.raises(BadRequestError, match="manufacturer"):
        swid(_manifest("", meta='<Meta edition="GPU"/>'), now=0.0)


def test_manifest_without_meta_is_refused() -> None:
    with pytest.raises(BadRequestError, match="meta information"):
        swid(_manifest("", meta=""), now=0.0)


def test_non_hex_hash_is_refused() -> None:
    with pytest.raises(BadRequestError, match="not hexadecimal"):
        swid(_manifest('<Resource type="Measurement" index="1" h:Hash0="zz"/>'), now=0.0)


def test_too_many_hashes_in_one_measurement_are_refused() -> None:
    hashes = " ".join(f'h:Hash{i}="ab"' for i in range(MAX_HASHES + 1))
    with pytest.raises(BadRequestError, match="more than"):
        swid(_manifest(f'<Resource type="Measurement" index="1" {hashes}/>'), now=0.0)


def test_name_a_policy_could_not_use_is_refused() -> None:
    meta = '<Meta edition="GPU&lt;script&gt;" r:PlatformManufacturerStr="Acme"/>'
    payload = _manifest('<Resource type="Measurement" index="1" h:Hash0="ab"/>', meta=meta)
    with pytest.raises(BadRequestError, match="invalid reference value name"):
        swid(payload, now=0.0)


def test_payload_that_is_not_base64_is_refused() -> None:
    with pytest.raises(BadRequestError, match="not base64"):
        swid("<SoftwareIdentity/>", now=0.0)
