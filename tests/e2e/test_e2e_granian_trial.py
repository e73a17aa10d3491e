"""The benchmark's granian trial (issue 23, ``bench/kbsbench/granian_server.py``) serves the same
config file as ``kbs`` does: each case runs under ``kbs`` (uvicorn) and under granian, so a
difference between the two servers fails here rather than in a benchmark figure.

HTTPS with two workers and the two TLS profiles granian can serve: a guest attests and gets its
secret over each, the versions the profile allows are the versions negotiated, and the audit
log the two workers wrote verifies once the server has stopped (each worker's lifespan ran).
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

import httpx
import pytest

from kbs_process import kbs, running_kbs, self_signed_cert
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.kbs.resource_policy import builtin_policy
from ports import free_port

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parents[2] / "bench"
GRANIAN = [sys.executable, "-m", "kbsbench.granian_server"]
SECRET = b"released over TLS by either server"


def _config(tmp_path: Path, port: int, profile: str) -> Path:
    config = tmp_path / "kbs.toml"
    config.write_text(
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\nworker_count = 2\n'
        f'private_key = "{tmp_path / "tls.key"}"\ncertificate = "{tmp_path / "tls.pem"}"\n'
        f'tls_profile = "{profile}"\n\n'
        '[admin]\nauthorization_mode = "InsecureAllowAll"\n\n'
        '[attestation_service]\ntype = "coco_as_builtin"\n\n'
        f'[storage_backend]\nstorage_type = "Memory"\n\n'
        f'[audit]\nsink = "file"\npath = "{tmp_path / "audit.log"}"\n'
        f'key_path = "{tmp_path / "audit.key"}"\n'
    )
    return config


def _tls12_only(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def _negotiated(url: str, context: ssl.SSLContext) -> str | None:
    """The TLS version a client with ``context`` gets (None: the handshake is refused)."""
    try:
        with httpx.Client(verify=context) as client:
            reply = client.get(f"{url}/healthz")
            assert reply.status_code == 200
            stream = reply.extensions["network_stream"]
            version: str = stream.get_extra_info("ssl_object").version()
            return version
    except httpx.ConnectError:
        return None


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
@pytest.mark.parametrize(
    ("profile", "tls12_client"), [("intermediate", "TLSv1.2"), ("modern", None)]
)
def test_a_guest_attests_and_gets_its_secret_over_https_under_both_servers(
    tmp_path: Path, server: str, profile: str, tls12_client: str | None
) -> None:
    cert, _key = self_signed_cert(tmp_path, "tls")
    assert kbs("audit", "keygen", "--out", str(tmp_path / "audit.key")).returncode == 0
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    granian = server == "granian"
    with running_kbs(
        ["-c", str(_config(tmp_path, port, profile))],
        tmp_path,
        url,
        verify=str(cert),
        command=GRANIAN if granian else None,
        env={"PYTHONPATH": str(BENCH)} if granian else None,
    ):
        admin = AdminClient(url, cert_file=cert)
        admin.set_resource("default/trial/key", SECRET)
        admin.set_resource_policy(builtin_policy("allow_all"))
        admin.close()
        for _ in range(4):  # fresh connections: the requests reach both workers
            guest = KbsClient(url, cert_file=cert)
            assert guest.get_resource("default/trial/key") == SECRET
            guest.close()
        assert _negotiated(url, ssl.create_default_context(cafile=str(cert))) == "TLSv1.3"
        assert _negotiated(url, _tls12_only(cert)) == tls12_client
    verified = kbs(
        "audit", "verify", str(tmp_path / "audit.log"), "--key", str(tmp_path / "audit.key")
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "chain intact" in verified.stdout
