"""The guest side of the KBS protocol: RCAR handshake, token, resource retrieval.

Speaks exactly what upstream's ``kbs_protocol`` client speaks, so it doubles as a conformance
peer for the server. Inject an ``httpx.Client`` (Starlette's ``TestClient`` is one) to drive an
app in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from keybroker.client.attesters import Attester, SampleAttester
from keybroker.client.http import make_http, send
from keybroker.client.keys import TeeKey
from keybroker.errors import ClientError, KbsRejectedError
from keybroker.protocol.canonical import HashAlgorithm, runtime_data, runtime_data_digest
from keybroker.protocol.models import PROTOCOL_VERSION, JsonValue
from keybroker.protocol.resource_path import ResourcePath

API = "/kbs/v0"


class KbsClient:
    def __init__(
        self,
        url: str,
        *,
        attester: Attester | None = None,
        device_attesters: list[Attester] | None = None,
        tee_key: TeeKey | None = None,
        init_data: str | None = None,
        http: httpx.Client | None = None,
        cert_file: Path | None = None,
    ) -> None:
        self._http = http if http is not None else make_http(url, cert_file)
        self._attester = attester or SampleAttester()
        self._devices = device_attesters or []
        self._tee_key = tee_key or TeeKey.generate()
        self._init_data = init_data
        self.token: str | None = None

    @property
    def tee_key(self) -> TeeKey:
        return self._tee_key

    def close(self) -> None:
        self._http.close()

    def attest(self) -> str:
        """Run the RCAR handshake; keep the session cookie; return the attestation token."""
        response = send(
            self._http,
            "POST",
            f"{API}/auth",
            json={
                "version": PROTOCOL_VERSION,
                "tee": self._attester.tee.value,
                "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512"]},
            },
        )
        challenge = _json_object(response)
        nonce = challenge.get("nonce")
        if not isinstance(nonce, str):
            raise ClientError("the KBS challenge carries no nonce")
        algorithm = _selected_algorithm(challenge.get("extra-params"))
        tee_pubkey = self._tee_key.public_jwk()
        additional = self._device_evidence(nonce, tee_pubkey, algorithm)
        data = runtime_data(nonce, tee_pubkey, additional)
        evidence = self._attester.evidence(runtime_data_digest(data, algorithm))
        body: dict[str, JsonValue] = {
            "init-data": ({"format": "toml", "body": self._init_data} if self._init_data else None),
            "runtime-data": {"nonce": nonce, "tee-pubkey": tee_pubkey},
            "tee-evidence": {"primary_evidence": evidence, "additional_evidence": additional},
        }
        token = _json_object(send(self._http, "POST", f"{API}/attest", json=body)).get("token")
        if not isinstance(token, str):
            raise ClientError("the KBS attestation reply carries no token")
        self.token = token
        return token

    def _device_evidence(
        self, nonce: str, tee_pubkey: dict[str, str], algorithm: HashAlgorithm
    ) -> str:
        """Devices bind the runtime data without additional evidence; the primary attester then
        binds theirs (upstream's composite evidence)."""
        if not self._devices:
            return ""
        digest = runtime_data_digest(runtime_data(nonce, tee_pubkey, None), algorithm)
        evidence = {device.tee.value: device.evidence(digest) for device in self._devices}
        return json.dumps(evidence, separators=(",", ":"))

    def get_resource(self, path: ResourcePath | str, *, version: int | None = None) -> bytes:
        """Fetch and decrypt a resource (its current version, or ``version``), attesting first
        (and again once on a 401)."""
        if self.token is None:
            self.attest()
        try:
            return self._fetch(path, headers={}, version=version)
        except KbsRejectedError as e:
            if e.http_status != 401:
                raise
        self.attest()
        return self._fetch(path, headers={}, version=version)

    def get_resource_with_token(
        self, path: ResourcePath | str, token: str, *, version: int | None = None
    ) -> bytes:
        """Passport mode: present a token obtained elsewhere (bound to this client's TEE key)."""
        headers = {"Authorization": f"Bearer {token}"}
        return self._fetch(path, headers=headers, version=version)

    def _fetch(
        self, path: ResourcePath | str, *, headers: dict[str, str], version: int | None = None
    ) -> bytes:
        resource = path if isinstance(path, ResourcePath) else ResourcePath.parse(path)
        query = "" if version is None else f"?version={int(version)}"
        response = send(self._http, "GET", f"{API}/resource/{resource}{query}", headers=headers)
        return self._tee_key.decrypt(_json_object(response))


def _json_object(response: httpx.Response) -> dict[str, JsonValue]:
    try:
        document = response.json()
    except json.JSONDecodeError:
        raise ClientError("the KBS answered with something that is not JSON") from None
    if not isinstance(document, dict):
        raise ClientError("the KBS answered with JSON that is not an object")
    return document


def _selected_algorithm(extra_params: JsonValue) -> HashAlgorithm:
    selected = (
        extra_params.get("selected-hash-algorithm") if isinstance(extra_params, dict) else None
    )
    if selected is None:
        return HashAlgorithm.SHA384
    if not isinstance(selected, str):
        raise ClientError("the KBS selected a hash algorithm that is not a string")
    try:
        return HashAlgorithm.parse(selected)
    except ValueError as e:
        raise ClientError(str(e)) from None
