"""The user's path: a real ``kbs`` process, driven by the ``kbs-client`` command line."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

import akp_upstream
from kbs_process import kbs_client, running_kbs
from keybroker.client.admin import AdminClient
from keybroker.client.keys import TeeKey
from keybroker.client.rcar import KbsClient
from keybroker.kbs.resource_policy import builtin_policy
from ports import free_port

pytestmark = pytest.mark.e2e

SECRET = b"\x00\x01binary secret\xff" * 50


def _config(tmp_path: Path, port: int, *, workers: int = 1) -> Path:
    config = tmp_path / "kbs-config.toml"
    config.write_text(
        f"""
[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true
worker_count = {workers}

[admin]
authorization_mode = "InsecureAllowAll"

[attestation_service]
type = "coco_as_builtin"
timeout = 5

[storage_backend]
storage_type = "LocalFs"
backends.local_fs.dir_path = "{tmp_path / "storage"}"

[[plugins]]
name = "resource"
storage_backend_type = "kvstorage"
"""
    )
    return config


def _write_keys(tmp_path: Path) -> tuple[Path, Path]:
    rsa_path, ec_path = tmp_path / "rsa.pem", tmp_path / "ec.pem"
    rsa_key = rsa.generate_private_key(65537, 2048)
    rsa_path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, as upstream's CLI takes
            serialization.NoEncryption(),
        )
    )
    ec_path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return rsa_path, ec_path


def test_cli_round_trip_with_ec_and_rsa_keys(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    secret_file = tmp_path / "secret.bin"
    secret_file.write_bytes(SECRET)
    rsa_path, ec_path = _write_keys(tmp_path)
    with running_kbs(["-c", str(_config(tmp_path, port))], tmp_path, url):
        set_resource = kbs_client(
            "--url",
            url,
            "config",
            "set-resource",
            "--path",
            "default/key/one",
            "--resource-file",
            str(secret_file),
        )
        assert set_resource.returncode == 0, set_resource.stderr

        denied = kbs_client("--url", url, "get-resource", "--path", "default/key/one")
        assert denied.returncode == 1
        assert "403" in denied.stderr and "Traceback" not in denied.stderr
        assert denied.stderr.count("\n") == 1  # one line

        allow = kbs_client("--url", url, "config", "set-resource-policy", "--allow-all")
        assert allow.returncode == 0, allow.stderr
        for args in ([], ["--tee-key-file", str(ec_path)], ["--tee-key-file", str(rsa_path)]):
            got = kbs_client("--url", url, "get-resource", "--path", "default/key/one", *args)
            assert got.returncode == 0, got.stderr
            assert base64.b64decode(got.stdout.strip()) == SECRET

        token = kbs_client("--url", url, "attest", "--tee-key-file", str(ec_path))
        assert token.returncode == 0 and token.stdout.count(".") == 2

        default = kbs_client("--url", url, "config", "set-resource-policy", "--default")
        assert default.returncode == 0
        again = kbs_client("--url", url, "get-resource", "--path", "default/key/one")
        assert again.returncode == 1 and "403" in again.stderr

        deleted = kbs_client("--url", url, "config", "delete-resource", "--path", "default/key/one")
        assert deleted.returncode == 0, deleted.stderr
    # upstream on-disk layout, readable by upstream's KBS
    stored = tmp_path / "storage" / "repository" / "default\\x2Fkey\\x2Fone"
    assert not stored.exists()


def test_ml_kem_768_tee_key_round_trip(tmp_path: Path) -> None:
    """Upstream's experimental AKP tee key (pqc-experimental) against a real kbs: the CLI with
    a fresh ML-KEM-768 key and with one from a PEM file (also as a bearer token's key), and the
    SDK's response opened the way upstream's guest opens it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "secret.bin").write_bytes(SECRET)
    private_key = MLKEM768PrivateKey.generate()
    pem = tmp_path / "ml-kem.pem"
    pem.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with running_kbs(["-c", str(_config(tmp_path, port))], tmp_path, url):
        admin = AdminClient(url)
        admin.set_resource("default/key/pq", SECRET)
        admin.set_resource_policy(builtin_policy("allow_all"))

        fresh = ["--tee-key-algorithm", "ML-KEM-768+A192KW"]
        for key in (fresh, ["--tee-key-file", str(pem)]):
            got = kbs_client("--url", url, "get-resource", "--path", "default/key/pq", *key)
            assert got.returncode == 0, got.stderr
            assert base64.b64decode(got.stdout.strip()) == SECRET
        token = kbs_client("--url", url, "attest", "--tee-key-file", str(pem))
        assert token.returncode == 0, token.stderr
        (tmp_path / "token").write_text(token.stdout)
        bearer = kbs_client(
            "--url", url, "get-resource", "--path", "default/key/pq",
            "--attestation-token", str(tmp_path / "token"), "--tee-key-file", str(pem),
        )  # fmt: skip
        assert bearer.returncode == 0, bearer.stderr
        assert base64.b64decode(bearer.stdout.strip()) == SECRET

        # the JWE as it crossed the wire, opened by the hand-written upstream guest
        responses: list[httpx.Response] = []
        http = httpx.Client(base_url=url, event_hooks={"response": [responses.append]})
        guest = KbsClient(url, tee_key=TeeKey(private_key), http=http)
        try:
            assert guest.get_resource("default/key/pq") == SECRET
        finally:
            guest.close()
        released = responses[-1]
        released.read()
        assert released.url.path == "/kbs/v0/resource/default/key/pq"
        assert akp_upstream.open_response(private_key, released.json()) == SECRET


@pytest.mark.parametrize(
    ("tee_pubkey", "message"),
    [
        (
            {"kty": "AKP", "alg": "ML-KEM-768+A192KW", "pub": akp_upstream.b64e(bytes(800))},
            "expected member 'pub' of 1184 bytes for ML-KEM-768, found 800 bytes",
        ),
        (
            {"kty": "AKP", "alg": "ML-KEM-1024+A256KW", "pub": akp_upstream.b64e(bytes(1568))},
            'expected alg "ML-KEM-768+A192KW" for an AKP key',
        ),
    ],
    ids=["wrong_length_akp_key", "unknown_akp_alg"],
)
def test_malformed_akp_tee_pubkey_refused_at_attest(
    tmp_path: Path, tee_pubkey: dict[str, str], message: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        running_kbs(["-c", str(_config(tmp_path, port))], tmp_path, url),
        httpx.Client(base_url=url) as http,
    ):
        challenge = http.post(
            "/kbs/v0/auth",
            json={"version": "0.4.0", "tee": "sample", "extra-params": {}},
        ).json()
        attested = http.post(
            "/kbs/v0/attest",
            json={
                "init-data": None,
                "runtime-data": {"nonce": challenge["nonce"], "tee-pubkey": tee_pubkey},
                "tee-evidence": {"primary_evidence": {}, "additional_evidence": ""},
            },
        )
    assert attested.status_code == 400
    assert message in attested.json()["detail"]


def test_two_workers_share_sessions(tmp_path: Path) -> None:
    """Handshakes whose requests land on different worker processes still succeed."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = _config(tmp_path, port, workers=2).read_text()
    config = config.replace('storage_type = "LocalFs"', 'storage_type = "Memory"')
    (tmp_path / "memory.toml").write_text(config)
    with running_kbs(["-c", str(tmp_path / "memory.toml")], tmp_path, url):
        admin = AdminClient(url)
        admin.set_resource("default/key/one", SECRET)
        admin.set_resource_policy(builtin_policy("allow_all"))

        def guest_round() -> bytes:
            # A fresh client per handshake: new connections land on either worker, and under
            # concurrency both workers serve. A token minted by one must verify on the other.
            no_keepalive = httpx.Limits(max_keepalive_connections=0)  # each request reconnects
            guest = KbsClient(url, http=httpx.Client(base_url=url, limits=no_keepalive))
            try:
                return guest.get_resource("default/key/one")
            finally:
                guest.close()

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda _: guest_round(), range(64)))
        assert results == [SECRET] * 64


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    result = kbs_client("--url", unreachable, "attest")
    assert result.returncode == 1
    assert result.stderr.startswith("kbs-client: error: cannot reach the KBS")
    bad_path = kbs_client("--url", unreachable, "get-resource", "--path", "../etc/passwd")
    assert bad_path.returncode == 1 and "Traceback" not in bad_path.stderr
    missing = kbs_client("config", "set-resource", "--path", "a/b/c", "--resource-file", "/nope")
    assert missing.returncode == 1 and "cannot read resource file" in missing.stderr


def test_readme_quick_start(tmp_path: Path) -> None:
    """`make run`'s server, then the README's quick start commands, literally, against a KBS on
    a port of the test's own (a developer's `make run` may hold 8080): the server is told with
    ``--listen`` and the commands with ``KBS_URL``, as the server's start-up hint says."""
    root = Path(__file__).resolve().parents[2]
    makefile = (root / "Makefile").read_text()
    # `make run` is exactly the server started below, less the port
    assert re.search(r"^run:.*\n\t\$\(BIN\)/kbs --insecure-dev$", makefile, re.M)
    readme = (root / "README.md").read_text()
    block = re.search(r"<!-- quick-start -->\s*```sh\n(.*?)```", readme, re.S)
    assert block is not None, "README lost its quick-start block"
    commands = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    assert any("get-resource" in c for c in commands)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env_path = "/usr/bin:/bin"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--insecure-dev", "--listen", f"127.0.0.1:{port}"]
    with running_kbs(args, tmp_path, url):
        output = ""
        for command in commands:
            done = subprocess.run(  # noqa: S602 - the README's shell lines, as a user runs them
                command,
                shell=True,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                env={"PATH": env_path, "HOME": str(tmp_path), "KBS_URL": url},
                check=False,
            )
            assert done.returncode == 0, f"{command}\n{done.stderr}"
            output = done.stdout
    assert output.strip() == "s3cr3t"
    assert (tmp_path / ".kbs" / "repository").is_dir()
    assert f"export KBS_URL={url}" in (tmp_path / "kbs.log").read_text()  # the hint says how
