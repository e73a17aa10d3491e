"""The ``tpm`` TEE through the KBS app: a default KBS offers it, a software-made quote by an
enrolled AK is attested (the runtime-data digest cut to the quote's 32 bytes) and released to,
and one by an unenrolled AK is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker.client.admin import AdminClient
from keybroker.client.attesters import Attester
from keybroker.client.rcar import KbsClient
from keybroker.errors import ClientError
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.protocol.models import JsonValue, Tee
from tpm_quotes import AK, OTHER_AK, evidence, pem

SECRET = b"tpm secret"


class SoftwareTpm(Attester):
    """Quotes as guest-components' tpm attester does, with a test AK."""

    tee = Tee.TPM

    def __init__(self, enrolled: bool = True) -> None:
        self._key = AK if enrolled else OTHER_AK

    def evidence(self, report_data: bytes) -> JsonValue:
        nonce = report_data[:32].ljust(32, b"\0")
        return evidence(nonce, signer=self._key, ak=self._key)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    (tmp_path / "ak.pub").write_bytes(pem(AK))
    verifiers = {"tpm_verifier": {"trusted_ak_keys_dir": str(tmp_path)}}
    config = kbs_config(
        attestation_service={"type": "coco_as_builtin", "verifier_config": verifiers}
    )
    with TestClient(create_app(config)) as client:
        admin = AdminClient("http://testserver", http=client)
        admin.set_resource("default/tpm/key", SECRET)
        admin.set_resource_policy(builtin_policy("default"))
        yield client


def test_default_kbs_offers_the_tpm_tee() -> None:
    with TestClient(create_app(kbs_config())) as client:
        reply = client.post(
            "/kbs/v0/auth", json={"version": "0.4.0", "tee": "tpm", "extra-params": {}}
        )
        assert reply.status_code == 200 and reply.json()["nonce"]


def test_enrolled_tpm_is_attested_and_released_to(client: TestClient) -> None:
    guest = KbsClient("http://testserver", http=client, attester=SoftwareTpm())
    assert guest.get_resource("default/tpm/key") == SECRET


def test_unenrolled_tpm_is_refused_at_attestation(client: TestClient) -> None:
    guest = KbsClient("http://testserver", http=client, attester=SoftwareTpm(enrolled=False))
    with pytest.raises(ClientError, match="not one of the trusted AKs"):
        guest.attest()
