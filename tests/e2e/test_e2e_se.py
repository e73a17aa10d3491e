"""A default ``kbs`` process set up for IBM SE as upstream's README does it: material in
upstream's layout, found through upstream's environment variables; a guest (simulated
Ultravisor, tests/se_guest.py) attests over real HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import vector
from kbs_process import running_kbs
from keybroker.client.keys import TeeKey
from keybroker.protocol.canonical import HashAlgorithm, runtime_data, runtime_data_digest
from keybroker.protocol.jws import decode_unverified
from keybroker.protocol.models import PROTOCOL_VERSION
from keybroker.verifiers.ibm.se_formats import parse_se_header
from ports import free_port
from se_guest import SePki, Ultravisor, attest, write_material

pytestmark = pytest.mark.e2e


def _environment(root: Path) -> dict[str, str]:
    return {
        "DEFAULT_SE_HOST_KEY_DOCUMENTS_ROOT": str(root / "hkds"),
        "SE_CERTIFICATES_ROOT": str(root / "certs"),
        "SE_CERTIFICATE_REVOCATION_LISTS_ROOT": str(root / "crls"),
        "SE_CERTIFICATE_ROOT_CA": str(root / "root_ca.crt"),
        "SE_IMAGE_HEADER_FILE": str(root / "hdr" / "hdr.bin"),
        "SE_MEASUREMENT_ENCR_KEY_PRIVATE": str(root / "rsa" / "encrypt_key.pem"),
        "SE_MEASUREMENT_ENCR_KEY_PUBLIC": str(root / "rsa" / "encrypt_key.pub"),
    }


def test_default_kbs_answers_se_auth_and_attests_an_se_guest(tmp_path: Path) -> None:
    pki = SePki()
    header = vector("verifier", "se", "secure_guest.hdr").read_bytes()
    root = write_material(tmp_path / "ibmse", pki, header, rsa.generate_private_key(65537, 3072))
    port = free_port()
    config = tmp_path / "kbs-config.toml"
    config.write_text(f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n')
    url = f"http://127.0.0.1:{port}"
    uv = Ultravisor(pki.host.key, parse_se_header(header).tags.to_bytes())
    with (
        running_kbs(["--config-file", str(config)], tmp_path, url, env=_environment(root)),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        reply = http.post(
            "/kbs/v0/auth",
            json={
                "version": PROTOCOL_VERSION,
                "tee": "se",
                "extra-params": {"supported-hash-algorithms": ["sha384", "sha512"]},
            },
        )
        assert reply.status_code == 200, reply.text
        challenge = reply.json()
        assert challenge["extra-params"]["selected-hash-algorithm"] == "sha512"
        nonce = challenge["nonce"]
        assert "request_blob" in json.loads(nonce)
        pubkey = TeeKey.generate().public_jwk()
        digest = runtime_data_digest(runtime_data(nonce, pubkey, ""), HashAlgorithm.SHA512)
        reply = http.post(
            "/kbs/v0/attest",
            json={
                "init-data": None,
                "runtime-data": {"nonce": nonce, "tee-pubkey": pubkey},
                "tee-evidence": {
                    "primary_evidence": attest(nonce, digest, uv),
                    "additional_evidence": "",
                },
            },
        )
        assert reply.status_code == 200, reply.text
        _, claims = decode_unverified(reply.json()["token"])
        submods = claims["submods"]
        assert isinstance(submods, dict)
        assert submods["cpu0"]["ear.veraison.annotated-evidence"]["se"]["version"] == 256
