"""Intel Trust Authority end to end, with real ``kbs`` processes and the ITA stand-in on HTTPS.

KBS1 (``type = "intel_ta"``) runs the background-check flow for a TDX guest (the SDK's
``KbsClient`` with a recorded-quote attester): ITA appraises, its token becomes the session's,
and a resource policy over ITA's claims releases. KBS2 (no attestation service, trusting ITA's
JWK set) releases to the same ITA token presented by ``kbs-client`` (passport mode).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import vector
from kbs_process import kbs_client, running_kbs
from keybroker.client.keys import TeeKey
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from keybroker.protocol.models import Tee
from keybroker.verifiers.intel.dcap import TdReportBody, parse_quote
from ports import free_port
from recorded_quotes import RecordedQuoteAttester
from standins.ita import ItaStandIn, running_ita_standin

pytestmark = pytest.mark.e2e

SECRET1 = b"released by KBS1 after ITA"
SECRET2 = b"released by KBS2 to the ITA token"
POLICY = """package policy
import rego.v1
default allow := false
allow if {{
    input.tdx.tdx_mrtd == "{mrtd}"
    input.tdx.attester_tcb_status == "UpToDate"
    input.iss == "Intel Trust Authority"
}}
"""


def _config(tmp_path: Path, name: str, port: int, service: str, trusted_jwks: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true

[attestation_token]
trusted_jwk_sets = ["{trusted_jwks}"]

{service}

[admin]
authorization_mode = "InsecureAllowAll"

[audit]
path = "{tmp_path / f"{name}-audit.log"}"
""")
    return path


def _admin(url: str, tmp_path: Path, *args: str) -> None:
    done = kbs_client("--url", url, "config", *args, env={"HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr


def _recorded_mrtd() -> str:
    """The MRTD of the quote ``RecordedQuoteAttester(Tee.TDX)`` sends."""
    body = parse_quote(vector("verifier", "tdx_quote_4.dat").read_bytes()).body
    assert isinstance(body, TdReportBody)
    return body.mr_td.hex()


def test_intel_ta_background_check_and_passport(tmp_path: Path) -> None:
    mrtd = _recorded_mrtd()
    stand_in = ItaStandIn()
    stand_in.policies["mrtd-policy"] = lambda claims: claims.get("tdx_mrtd") == mrtd
    key = rsa.generate_private_key(65537, 3072)
    key_file = tmp_path / "tee-key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    port1, port2 = free_port(), free_port()
    kbs1_url, kbs2_url = f"http://127.0.0.1:{port1}", f"http://127.0.0.1:{port2}"
    with running_ita_standin(tmp_path, stand_in) as ita:
        kbs1 = _config(
            tmp_path,
            "kbs1",
            port1,
            f"""[attestation_service]
type = "intel_ta"
base_url = "{ita.base_url}"
api_key = "{ita.api_key}"
certs_file = "{ita.base_url}"
policy_ids = ["mrtd-policy"]
request_timeout = 10
""",
            ita.jwks_url,
        )
        kbs2 = _config(
            tmp_path, "kbs2", port2, '[attestation_service]\ntype = "none"', ita.jwks_url
        )
        (tmp_path / "policy.rego").write_text(POLICY.format(mrtd=mrtd))
        (tmp_path / "wrong-policy.rego").write_text(POLICY.format(mrtd="00" * 48))
        (tmp_path / "secret1").write_bytes(SECRET1)
        (tmp_path / "secret2").write_bytes(SECRET2)
        env = {"SSL_CERT_FILE": str(ita.ca_path)}
        with (
            running_kbs(["-c", str(kbs1)], tmp_path, kbs1_url, env=env, log_name="kbs1.log"),
            running_kbs(["-c", str(kbs2)], tmp_path, kbs2_url, env=env, log_name="kbs2.log"),
        ):
            for url, secret in ((kbs1_url, "secret1"), (kbs2_url, "secret2")):
                _admin(
                    url,
                    tmp_path,
                    "set-resource",
                    "--path",
                    "default/key/ita",
                    "--resource-file",
                    str(tmp_path / secret),
                )
                _admin(
                    url,
                    tmp_path,
                    "set-resource-policy",
                    "--policy-file",
                    str(tmp_path / "policy.rego"),
                )

            # background check: the SDK guest attests through KBS1, which asks ITA
            guest = KbsClient(
                kbs1_url, attester=RecordedQuoteAttester(Tee.TDX), tee_key=TeeKey(key)
            )
            assert guest.get_resource("default/key/ita") == SECRET1
            token = guest.token or ""
            assert stand_in.requests[-1]["policy_ids"] == ["mrtd-policy"]
            guest.close()

            # passport: kbs-client presents the ITA token to KBS2, which trusts ITA's JWKS
            (tmp_path / "token").write_text(token)
            got = kbs_client(
                "--url",
                kbs2_url,
                "get-resource",
                "--path",
                "default/key/ita",
                "--attestation-token",
                str(tmp_path / "token"),
                "--tee-key-file",
                str(key_file),
            )
            assert got.returncode == 0, got.stderr
            assert base64.b64decode(got.stdout) == SECRET2

            # the resource policy sees ITA's claims: another MRTD is denied
            _admin(
                kbs2_url,
                tmp_path,
                "set-resource-policy",
                "--policy-file",
                str(tmp_path / "wrong-policy.rego"),
            )
            denied = kbs_client(
                "--url",
                kbs2_url,
                "get-resource",
                "--path",
                "default/key/ita",
                "--attestation-token",
                str(tmp_path / "token"),
                "--tee-key-file",
                str(key_file),
            )
            assert denied.returncode != 0 and "403" in denied.stderr + denied.stdout

            # a token ITA issued for another nonce is refused at KBS1
            def other_nonce(header: dict[str, object], claims: dict[str, object]) -> None:
                tdx = claims["tdx"]
                assert isinstance(tdx, dict)
                tdx["attester_runtime_data"]["nonce"] = base64.b64encode(b"\2" * 32).decode()

            stand_in.tamper = other_nonce
            replayed = KbsClient(kbs1_url, attester=RecordedQuoteAttester(Tee.TDX))
            with pytest.raises(KbsRejectedError) as refused:
                replayed.attest()
            replayed.close()
            assert refused.value.http_status == 401 and "another nonce" in refused.value.detail
    logs = (tmp_path / "kbs1.log").read_text() + (tmp_path / "kbs2.log").read_text()
    audit = (tmp_path / "kbs1-audit.log").read_text()
    assert ita.api_key not in logs + audit
    # the attest record names ITA's verdict and the guest (its TEE and a hash of its key)
    assert "intel trust authority tdx UpToDate" in audit
    assert '"tee":"tdx"' in audit and '"tee_pubkey_sha256":null' not in audit
