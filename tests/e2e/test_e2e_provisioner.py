"""The ``provisioner`` plugin with a real ``kbs`` process: an operator with an admin token
provisions a VM, the VM's guest attests (sample TEE, init-data naming its resource) and opens
its sealed LUKS key, the operator deprovisions it; and the attacks on each step, by name.

One KBS serves the whole module (each test uses its own VM names); its store is a LocalFs
directory, so the tests also see upstream's on-disk layout.
"""

from __future__ import annotations

import json
import stat
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from admin_tokens import mint, write_public_pem
from kbs_process import kbs_client, running_kbs
from keybroker.client.rcar import KbsClient
from ports import free_port

pytestmark = pytest.mark.e2e

PROVISION = "/kbs/v0/provisioner/provision"
UPSTREAM_NAMESPACE = uuid.UUID("feab5599-6854-52bc-95f0-0241c03e620a")
CONFDATA_KEY = "io.cryptsetup.key.text.root"

# Guests may use the provisioner plugin; which VM's key a guest gets is the plugin's decision
# (its init-data), not the policy's.
POLICY = """package policy

import rego.v1

default allow := false

allow if {
    data.plugin == "provisioner"
}
"""


@dataclass
class Kbs:
    url: str
    store: Path  # <dir_path>/provisioner, upstream's LocalFs layout
    admin: dict[str, str]  # role operator: the provisioner's admin paths only (docs/plugins.md)
    editor: dict[str, str]  # role policy-editor: may not provision
    editor_token_file: Path
    logs: list[Path]


def _config(tmp_path: Path, port: int, public_key: Path) -> Path:
    config = tmp_path / "kbs-config.toml"
    config.write_text(
        f"""
[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true

[admin]
authorization_mode = "AuthenticatedAuthorization"

[admin.authentication.bearer_jwt]
identity_providers = [{{ issuer = "ops", public_key_uri = "{public_key}" }}]

[admin.authorization.regex_acl]
acls = [
    {{ role = "operator", allowed_endpoints = "^/kbs/v0/provisioner/provision(/.*)?$" }},
    {{ role = "policy-editor", allowed_endpoints = "^/kbs/v0/resource-policy$" }},
]

[storage_backend]
storage_type = "LocalFs"
backends.local_fs.dir_path = "{tmp_path / "storage"}"

[[plugins]]
name = "provisioner"
key_length = 32
"""
    )
    return config


def _bearer(key: ec.EllipticCurvePrivateKey, role: str) -> str:
    return mint(key, role=role, iss="ops", exp=int(time.time()) + 3600)


@pytest.fixture(scope="module")
def kbs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kbs]:
    tmp_path = tmp_path_factory.mktemp("provisioner")
    key = ec.generate_private_key(ec.SECP256R1())
    public_key = write_public_pem(key, tmp_path / "admin.pub.pem")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    admin, editor = _bearer(key, "operator"), _bearer(key, "policy-editor")
    editor_file = tmp_path / "editor-token"
    editor_file.write_text(editor)
    (tmp_path / "policy.rego").write_text(POLICY)
    with running_kbs(["-c", str(_config(tmp_path, port, public_key))], tmp_path, url):
        policy = kbs_client(
            "--url",
            url,
            "config",
            "--admin-token-file",
            str(editor_file),
            "set-resource-policy",
            "--policy-file",
            str(tmp_path / "policy.rego"),
        )
        assert policy.returncode == 0, policy.stderr
        yield Kbs(
            url=url,
            store=tmp_path / "storage" / "provisioner",
            admin={"Authorization": f"Bearer {admin}"},
            editor={"Authorization": f"Bearer {editor}"},
            editor_token_file=editor_file,
            logs=[tmp_path / "kbs.log", tmp_path / "kbs-audit.log"],
        )


def _provision(kbs: Kbs, vm_name: str, namespace: str | None = None) -> dict[str, str]:
    body = {"vm_name": vm_name} | ({"namespace": namespace} if namespace else {})
    reply = httpx.post(f"{kbs.url}{PROVISION}", json=body, headers=kbs.admin)
    assert reply.status_code == 200, reply.text
    answer: dict[str, str] = reply.json()
    return answer


def _init_data(resource_path: str) -> str:
    return (
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
        f'"trustee.kbs.resource" = "kbs+provisioner:///{resource_path}"\n'
    )


def _guest_fetch(kbs: Kbs, bound_to: str | None, resource_path: str) -> tuple[int, bytes]:
    """A guest launched with init-data naming ``bound_to`` attests, then asks for
    ``resource_path``: (status, the opened document or the error body)."""
    client = KbsClient(kbs.url, init_data=_init_data(bound_to) if bound_to else None)
    try:
        headers = {"Authorization": f"Bearer {client.attest()}"}
        reply = httpx.get(f"{kbs.url}/kbs/v0/provisioner/{resource_path}", headers=headers)
        if reply.status_code != 200:
            return reply.status_code, reply.content
        sealed = reply.json()
        assert set(sealed) >= {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
        return 200, client.tee_key.decrypt(sealed)
    finally:
        client.close()


def _stored_file(kbs: Kbs, resource_path: str) -> Path:
    return kbs.store / resource_path.replace("/", "\\x2F")


def _keys(kbs: Kbs) -> list[str]:
    """Every file of the provisioner and resource namespaces (sessions come and go)."""
    namespaces = (kbs.store, kbs.store.parent / "repository")
    return sorted(str(f) for namespace in namespaces for f in namespace.rglob("*"))


def test_provision_then_the_attested_guest_opens_its_key_then_deprovision(kbs: Kbs) -> None:
    answer = _provision(kbs, "vm-1", "tenant-a")
    vm_uuid = str(uuid.uuid5(UPSTREAM_NAMESPACE, "tenant-a/vm-1"))
    assert answer == {"uuid": vm_uuid, "resource_path": f"default/{vm_uuid}/root"}
    stored = _stored_file(kbs, answer["resource_path"])
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    passphrase = tomllib.loads(stored.read_text())["data"][CONFDATA_KEY]
    assert len(passphrase) == 32 and passphrase.isalnum()

    status, document = _guest_fetch(kbs, answer["resource_path"], answer["resource_path"])
    assert status == 200, document
    opened = tomllib.loads(document.decode())
    assert opened == {"version": "0.1.0", "data": {CONFDATA_KEY: passphrase}}

    assert _provision(kbs, "vm-1", "tenant-a") == answer  # again: same answer, same key
    assert tomllib.loads(stored.read_text())["data"][CONFDATA_KEY] == passphrase

    deleted = httpx.delete(f"{kbs.url}{PROVISION}/{vm_uuid}", headers=kbs.admin)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"status": "deleted"}
    assert not stored.exists()
    status, error = _guest_fetch(kbs, answer["resource_path"], answer["resource_path"])
    assert status == 404 and b"ResourceNotFound" in error
    for log in kbs.logs:
        assert passphrase not in log.read_text()  # the key is never logged or audited


def test_unauthenticated_provision_is_refused(kbs: Kbs) -> None:
    body = {"vm_name": "intruder-vm"}
    anonymous = httpx.post(f"{kbs.url}{PROVISION}", json=body)
    assert anonymous.status_code == 401 and "AdminAuthAccess" in anonymous.text
    forged_key = ec.generate_private_key(ec.SECP256R1())
    forged = {"Authorization": f"Bearer {_bearer(forged_key, 'operator')}"}
    assert httpx.post(f"{kbs.url}{PROVISION}", json=body, headers=forged).status_code == 401
    # an admin whose role does not cover the provisioner paths
    wrong_role = httpx.post(f"{kbs.url}{PROVISION}", json=body, headers=kbs.editor)
    assert wrong_role.status_code == 403 and "policy-editor" in wrong_role.text
    # a guest's attestation token is not an admin token
    client = KbsClient(kbs.url)
    try:
        guest = {"Authorization": f"Bearer {client.attest()}"}
    finally:
        client.close()
    assert httpx.post(f"{kbs.url}{PROVISION}", json=body, headers=guest).status_code == 401
    vm_uuid = uuid.uuid5(UPSTREAM_NAMESPACE, "default/intruder-vm")
    assert not _stored_file(kbs, f"default/{vm_uuid}/root").exists()


def test_unauthenticated_deprovision_is_refused(kbs: Kbs) -> None:
    answer = _provision(kbs, "vm-kept")
    url = f"{kbs.url}{PROVISION}/{answer['uuid']}"
    assert httpx.delete(url).status_code == 401
    assert httpx.delete(url, headers=kbs.editor).status_code == 403
    assert _stored_file(kbs, answer["resource_path"]).exists()


def test_traversal_in_an_identity_is_refused(kbs: Kbs) -> None:
    before = _keys(kbs)
    for body in (
        {"vm_name": "../../repository/default/key/one"},
        {"vm_name": "vm", "namespace": "../.."},
        {"vm_name": "b/c", "namespace": "a"},
    ):
        reply = httpx.post(f"{kbs.url}{PROVISION}", json=body, headers=kbs.admin)
        assert reply.status_code == 400, (body, reply.text)
        assert "starting with a letter or digit" in reply.json()["detail"]
    # encoded separators and dot segments in the path never reach the store
    for path in (
        f"{PROVISION}/..%2F..%2Frepository%2Fdefault",
        f"{PROVISION}/%2E%2E",
    ):
        reply = httpx.delete(f"{kbs.url}{path}", headers=kbs.admin)
        assert reply.status_code == 400, (path, reply.text)
    client = KbsClient(kbs.url)
    try:
        guest = {"Authorization": f"Bearer {client.attest()}"}
    finally:
        client.close()
    reply = httpx.get(f"{kbs.url}/kbs/v0/provisioner/default/%2E%2E/root", headers=guest)
    assert reply.status_code == 400, reply.text
    assert _keys(kbs) == before


def test_an_oversized_provision_body_is_refused(kbs: Kbs) -> None:
    padded = json.dumps({"vm_name": "vm-big", "namespace": "n" * 5000}).encode()
    reply = httpx.post(f"{kbs.url}{PROVISION}", content=padded, headers=kbs.admin)
    assert reply.status_code == 413 and "at most 4096 bytes" in reply.text
    huge = b" " * (3 * 1024 * 1024)  # past the KBS's 2 MiB payload limit
    reply = httpx.post(f"{kbs.url}{PROVISION}", content=huge, headers=kbs.admin)
    assert reply.status_code == 413
    # unauthenticated: refused as well, and never parsed
    assert httpx.post(f"{kbs.url}{PROVISION}", content=padded).status_code == 413


def test_a_guest_of_another_vm_is_refused(kbs: Kbs) -> None:
    mine = _provision(kbs, "vm-mine")["resource_path"]
    theirs = _provision(kbs, "vm-theirs")["resource_path"]
    status, error = _guest_fetch(kbs, mine, theirs)
    assert status == 403 and b"PolicyDeny" in error and b"binds" in error
    status, error = _guest_fetch(kbs, None, theirs)  # no init-data at all
    assert status == 403 and b"no `trustee.kbs.resource`" in error
    status, _ = _guest_fetch(kbs, mine, mine)
    assert status == 200
    assert httpx.get(f"{kbs.url}/kbs/v0/provisioner/{mine}").status_code == 401  # no token


def test_a_guest_the_resource_policy_refuses_is_refused(kbs: Kbs) -> None:
    mine = _provision(kbs, "vm-policy")["resource_path"]

    def set_policy(*args: str) -> None:
        done = kbs_client(
            "--url",
            kbs.url,
            "config",
            "--admin-token-file",
            str(kbs.editor_token_file),
            "set-resource-policy",
            *args,
        )
        assert done.returncode == 0, done.stderr

    set_policy("--deny-all")
    try:
        status, error = _guest_fetch(kbs, mine, mine)
        assert status == 403 and b"denied by policy" in error
    finally:
        set_policy("--policy-file", str(kbs.editor_token_file.parent / "policy.rego"))
    assert _guest_fetch(kbs, mine, mine)[0] == 200


def test_deprovision_of_an_unknown_id_is_refused(kbs: Kbs) -> None:
    unknown = uuid.uuid5(UPSTREAM_NAMESPACE, "default/never-provisioned")
    reply = httpx.delete(f"{kbs.url}{PROVISION}/{unknown}", headers=kbs.admin)
    assert reply.status_code == 404 and "no VM is provisioned" in reply.text
    reply = httpx.delete(f"{kbs.url}{PROVISION}/not-a-uuid", headers=kbs.admin)
    assert reply.status_code == 400 and "not a VM uuid" in reply.text
    reply = httpx.delete(f"{kbs.url}{PROVISION}", headers=kbs.admin)
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"
