"""KBS -> remote Attestation Service over gRPC, as separate processes on loopback."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from kbs_process import BIN, kbs_client, running_kbs, self_signed_cert, wait_listening
from keybroker.grpc_api import (
    attestation_pb2,
    attestation_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
)
from pki import issue, write
from ports import free_port

pytestmark = pytest.mark.e2e

AFFIRMING_CPU = """package policy
trust_claims := {"executables": 3, "hardware": 2, "configuration": 2}
"""


@contextmanager
def grpc_as(
    tmp_path: Path, port: int, *, tls: tuple[Path, Path] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log_path = tmp_path / "grpc-as.log"
    log = log_path.open("ab")
    tls_args = ["-t", str(tls[0]), "-k", str(tls[1])] if tls else []
    process = subprocess.Popen(
        [
            str(BIN / "grpc-as"),
            "-c",
            str(tmp_path / "as.toml"),
            "-s",
            f"127.0.0.1:{port}",
            *tls_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_listening(process, port, log_path)
        channel = (
            grpc.secure_channel(
                f"127.0.0.1:{port}", grpc.ssl_channel_credentials(tls[0].read_bytes())
            )
            if tls
            else grpc.insecure_channel(f"127.0.0.1:{port}")
        )
        grpc.channel_ready_future(channel).result(timeout=30)
        channel.close()
        yield process
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def test_background_check_through_grpc_as(tmp_path: Path) -> None:
    ca = issue("AS signer CA")
    signer = issue("grpc-as token signer", ca, ca=False)
    (tmp_path / "signer.key").write_bytes(signer.key_pem())
    (tmp_path / "signer.key").chmod(0o600)  # grpc-as refuses a key others can read
    write(tmp_path / "chain.pem", signer, ca)
    write(tmp_path / "ca.pem", ca)
    (tmp_path / "as.toml").write_text(
        f'[attestation_token_broker]\nsigner = {{ key_path = "{tmp_path / "signer.key"}", '
        f'cert_path = "{tmp_path / "chain.pem"}" }}\n'
    )
    as_port, kbs_port = free_port(), free_port()
    url = f"http://127.0.0.1:{kbs_port}"
    (tmp_path / "kbs.toml").write_text(f"""
[http_server]
sockets = ["127.0.0.1:{kbs_port}"]
insecure_http = true

[attestation_service]
type = "coco_as_grpc"
as_addr = "http://127.0.0.1:{as_port}"
request_timeout = 3

[attestation_token]
trusted_certs_paths = ["{tmp_path / "ca.pem"}"]

[admin]
authorization_mode = "InsecureAllowAll"
""")
    (tmp_path / "secret").write_bytes(b"via grpc-as")
    (tmp_path / "cpu.rego").write_text(AFFIRMING_CPU)

    with grpc_as(tmp_path, as_port), running_kbs(["-c", str(tmp_path / "kbs.toml")], tmp_path, url):
        for args in (
            ["set-resource", "--path", "a/b/c", "--resource-file", str(tmp_path / "secret")],
            ["set-resource-policy", "--affirming"],
        ):
            assert kbs_client("--url", url, "config", *args).returncode == 0
        # the default policy of the remote AS leaves the sample guest contraindicated
        denied = kbs_client("--url", url, "get-resource", "--path", "a/b/c")
        assert denied.returncode == 1 and "403" in denied.stderr
        # a policy set through the KBS admin API is enforced by the remote AS
        policy = kbs_client(
            "--url",
            url,
            "config",
            "set-attestation-policy",
            "--policy-file",
            str(tmp_path / "cpu.rego"),
            "--id",
            "default_cpu",
        )
        assert policy.returncode == 0, policy.stderr
        got = kbs_client("--url", url, "get-resource", "--path", "a/b/c")
        assert got.returncode == 0, got.stderr
        assert base64.b64decode(got.stdout) == b"via grpc-as"

    # the AS is down (the KBS keeps running in its own context below)
    with running_kbs(["-c", str(tmp_path / "kbs.toml")], tmp_path, url, log_name="kbs2.log"):
        start = time.monotonic()
        outage = kbs_client("--url", url, "attest")
        assert outage.returncode == 1 and "503" in outage.stderr
        assert "unavailable" in outage.stderr
        # within request_timeout (3 s) plus a kbs-client start: no hang (generous for a loaded
        # 2-core machine; the gRPC default would wait far longer)
        assert time.monotonic() - start < 30
        with grpc_as(tmp_path, as_port):  # back: the KBS recovers without a restart
            # within about a second (the KBS's reconnect backoff is capped), as a guest that
            # retries after "503 retry later" sees it
            back = time.monotonic()
            recovered = kbs_client("--url", url, "attest")
            # (a bound generous for a loaded machine, still far below gRPC's default backoff
            # of up to two minutes)
            while recovered.returncode != 0 and time.monotonic() - back < 20:
                time.sleep(0.2)
                recovered = kbs_client("--url", url, "attest")
            assert recovered.returncode == 0, recovered.stderr


def test_raw_protobuf_client_calls_every_rpc(tmp_path: Path) -> None:
    """Interchangeability: a client built only from our .proto files."""
    (tmp_path / "as.toml").write_text("")
    port = free_port()
    with grpc_as(tmp_path, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = attestation_pb2_grpc.AttestationServiceStub(channel)
        challenge = stub.GetAttestationChallenge(attestation_pb2.ChallengeRequest())
        assert len(base64.b64decode(challenge.attestation_challenge)) == 32
        policy = base64.urlsafe_b64encode(AFFIRMING_CPU.encode()).rstrip(b"=").decode()
        stub.SetAttestationPolicy(
            attestation_pb2.SetPolicyRequest(policy_id="default_cpu", policy=policy)
        )
        report_data = bytes(range(48))
        evidence = json.dumps(
            {"svn": "1", "report_data": base64.b64encode(report_data).decode()}
        ).encode()
        reply = stub.AttestationEvaluate(
            attestation_pb2.AttestationRequest(
                verification_requests=[
                    attestation_pb2.IndividualAttestationRequest(
                        tee="sample",
                        evidence=base64.urlsafe_b64encode(evidence).rstrip(b"=").decode(),
                        raw_runtime_data=base64.urlsafe_b64encode(report_data)
                        .rstrip(b"=")
                        .decode(),
                    )
                ],
                policy_ids=["default"],
            )
        )
        payload = reply.attestation_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["submods"]["cpu0"]["ear.status"] == "affirming"
        with pytest.raises(grpc.RpcError) as refused:
            stub.AttestationEvaluate(
                attestation_pb2.AttestationRequest(
                    verification_requests=[
                        attestation_pb2.IndividualAttestationRequest(
                            tee="sample",
                            evidence=base64.urlsafe_b64encode(evidence).decode(),
                            raw_runtime_data=base64.urlsafe_b64encode(b"other").decode(),
                        )
                    ]
                )
            )
        assert refused.value.code() == grpc.StatusCode.ABORTED


@contextmanager
def rvps(tmp_path: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    log_path = tmp_path / "rvps.log"
    log = log_path.open("ab")
    process = subprocess.Popen(
        [str(BIN / "rvps"), "-a", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_listening(process, port, log_path)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        channel.close()
        yield process
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def _rvps_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rvps-tool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_kbs_grpc_as_and_rvps_as_three_processes(tmp_path: Path) -> None:
    rvps_port, as_port, kbs_port = free_port(), free_port(), free_port()
    (tmp_path / "as.toml").write_text(
        f'[rvps_config]\ntype = "GrpcRemote"\naddress = "http://127.0.0.1:{rvps_port}"\n'
    )
    url = f"http://127.0.0.1:{kbs_port}"
    (tmp_path / "kbs.toml").write_text(f"""
[http_server]
sockets = ["127.0.0.1:{kbs_port}"]
insecure_http = true

[attestation_service]
type = "coco_as_grpc"
as_addr = "http://127.0.0.1:{as_port}"
request_timeout = 5
rvps_addr = "http://127.0.0.1:{rvps_port}"

[attestation_token]
insecure_header_jwk = true  # the AS signs with an ephemeral key in this test

[admin]
authorization_mode = "InsecureAllowAll"
""")
    values = {
        "svn": ["1"],
        "launch_digest": ["abcde"],
        "major_version": 1,
        "minimum_minor_version": 1,
    }
    payload = base64.b64encode(json.dumps(values).encode()).decode()
    message = tmp_path / "message.json"
    message.write_text(json.dumps({"version": "0.1.0", "type": "sample", "payload": payload}))
    (tmp_path / "secret").write_bytes(b"three processes")
    with (
        rvps(tmp_path, rvps_port),
        grpc_as(tmp_path, as_port),
        running_kbs(["-c", str(tmp_path / "kbs.toml")], tmp_path, url),
    ):
        registered = _rvps_tool(
            "register", "--path", str(message), "--addr", f"http://127.0.0.1:{rvps_port}"
        )
        assert registered.returncode == 0, registered.stderr
        queried = _rvps_tool("query", "--id", "svn", "--addr", f"http://127.0.0.1:{rvps_port}")
        assert json.loads(queried.stdout) == ["1"]
        # the KBS admin API reaches the same RVPS
        via_kbs = kbs_client("--url", url, "config", "get-reference-value", "--id", "launch_digest")
        assert json.loads(via_kbs.stdout) == ["abcde"]
        minor = kbs_client(
            "--url",
            url,
            "config",
            "set-sample-reference-value",
            "minimum_minor_version",
            "1",
            "--as-integer",
            "--as-single-value",
        )
        assert minor.returncode == 0, minor.stderr
        for args in (
            ["set-resource", "--path", "a/b/c", "--resource-file", str(tmp_path / "secret")],
            ["set-resource-policy", "--affirming"],
        ):
            assert kbs_client("--url", url, "config", *args).returncode == 0
        got = kbs_client("--url", url, "get-resource", "--path", "a/b/c")
        assert got.returncode == 0, got.stderr  # affirming thanks to the RVPS's values
        assert base64.b64decode(got.stdout) == b"three processes"

    with (
        grpc_as(tmp_path, as_port),
        running_kbs(["-c", str(tmp_path / "kbs.toml")], tmp_path, url, log_name="kbs2.log"),
    ):
        down = kbs_client("--url", url, "attest")  # the RVPS is gone: fail closed
        assert down.returncode == 1 and "503" in down.stderr


def test_grpc_as_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path, "as", "127.0.0.1")
    (tmp_path / "as.toml").write_text("")
    as_port, kbs_port = free_port(), free_port()
    url = f"http://127.0.0.1:{kbs_port}"
    (tmp_path / "kbs.toml").write_text(f"""
[http_server]
sockets = ["127.0.0.1:{kbs_port}"]
insecure_http = true

[attestation_service]
type = "coco_as_grpc"
as_addr = "https://127.0.0.1:{as_port}"

[attestation_token]
insecure_header_jwk = true

[admin]
authorization_mode = "InsecureAllowAll"
""")
    with (
        grpc_as(tmp_path, as_port, tls=(cert, key)),
        running_kbs(
            ["-c", str(tmp_path / "kbs.toml")], tmp_path, url, env={"SSL_CERT_FILE": str(cert)}
        ),
    ):
        attested = kbs_client("--url", url, "attest")
        assert attested.returncode == 0, attested.stderr


def test_raw_protobuf_client_calls_every_rvps_rpc(tmp_path: Path) -> None:
    port = free_port()
    payload = base64.b64encode(json.dumps({"svn": ["7"]}).encode()).decode()
    message = json.dumps({"version": "0.1.0", "type": "sample", "payload": payload})
    with rvps(tmp_path, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reference_pb2_grpc.ReferenceValueProviderServiceStub(channel)
        stub.RegisterReferenceValue(reference_pb2.ReferenceValueRegisterRequest(message=message))
        found = stub.QueryReferenceValue(
            reference_pb2.ReferenceValueQueryRequest(reference_value_id="svn")
        )
        assert json.loads(found.reference_value_results) == ["7"]
        missing = stub.QueryReferenceValue(
            reference_pb2.ReferenceValueQueryRequest(reference_value_id="absent")
        )
        assert not missing.HasField("reference_value_results")
        with pytest.raises(grpc.RpcError) as refused:
            stub.RegisterReferenceValue(reference_pb2.ReferenceValueRegisterRequest(message="{"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
