"""Upstream's command lines, run as processes (issue 20 §3): ``--version`` everywhere,
``rvps`` on the Helm chart's ``rvps.json`` with ``rvps-tool -p/-r/-a``, ``grpc-as
--https-pubkey-cert/--https-prikey`` and ``restful-as --allowed_origin``."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx
import pytest

from conftest import vector
from kbs_process import BIN, self_signed_cert, wait_listening
from keybroker import __version__
from ports import free_port

pytestmark = pytest.mark.e2e

COMMANDS = ("kbs", "kbs-client", "grpc-as", "restful-as", "rvps", "rvps-tool")
SWID_NAME = "NVIDIA_Corporation.GPU.measurement_12"
SWID_DIGEST = (
    "758af96044c700f98a85347be27124d51c05b8784ba216b6"
    "29b9aaab6d538c759aed9922a133e4ac473564d359b271d5"
)


@contextmanager
def serving(
    tmp_path: Path, name: str, args: list[str], port: int
) -> Iterator[subprocess.Popen[bytes]]:
    log_path = tmp_path / f"{name}.log"
    log = log_path.open("ab")
    process = subprocess.Popen([str(BIN / name), *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(process, port, log_path)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def _run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / name), *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_version_flag(command: str) -> None:
    for flag in ("--version", "-V"):
        shown = _run(command, flag)
        assert shown.returncode == 0, shown.stderr
        assert __version__ in shown.stdout


def _helm_rvps_json(directory: Path) -> str:
    """The chart's rvps.json rendered with its default storage type and this test's directory."""
    values = {
        "coco-trustee.storage.type": "LocalFs",
        "coco-trustee.storage.rvpsLocalDir": str(directory / "reference_values"),
        "coco-trustee.storage.localJsonDir": str(directory / "local-json"),
    }
    template = vector("rvps", "helm-rvps.json.template").read_text()
    return re.sub(r'\{\{ include "([^"]+)" \. \}\}', lambda m: values[m[1]], template)


def test_rvps_on_the_helm_config_with_upstream_rvps_tool_flags(tmp_path: Path) -> None:
    (tmp_path / "rvps.json").write_text(_helm_rvps_json(tmp_path))
    swid_payload = vector("rvps", "swid", "test-rim.b64").read_text().strip()
    message = tmp_path / "swid.json"
    message.write_text(json.dumps({"version": "0.1.0", "type": "swid", "payload": swid_payload}))
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    rvps_args = ["-c", str(tmp_path / "rvps.json"), "-a", f"127.0.0.1:{port}"]
    with serving(tmp_path, "rvps", rvps_args, port):
        registered = _run("rvps-tool", "register", "-p", str(message), "-a", address)
        assert registered.returncode == 0, registered.stderr
        queried = _run("rvps-tool", "query", "-r", SWID_NAME, "-a", address)
        assert queried.returncode == 0, queried.stderr
        assert SWID_DIGEST in json.loads(queried.stdout)
    # LocalFs, as the file says: a new process still has the values
    with serving(tmp_path, "rvps", rvps_args, port):
        again = _run("rvps-tool", "query", "--reference-value-id", SWID_NAME, "--addr", address)
        assert again.returncode == 0, again.stderr
        assert SWID_DIGEST in json.loads(again.stdout)


def test_grpc_as_serves_tls_with_upstream_flag_names(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path, "as", "127.0.0.1")
    port = free_port()
    args = ["-s", f"127.0.0.1:{port}", "--https-pubkey-cert", str(cert), "--https-prikey", str(key)]
    with serving(tmp_path, "grpc-as", args, port):
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)


def test_restful_as_allowed_origin_sends_cors_headers(tmp_path: Path) -> None:
    port = free_port()
    origins = [
        "-r",
        "https://ui.example,http://localhost:3000",
        "--allowed_origin",
        "https://b.example",
    ]
    with serving(tmp_path, "restful-as", ["-s", f"127.0.0.1:{port}", *origins], port):
        url = f"http://127.0.0.1:{port}/policy"
        for origin in ("https://ui.example", "http://localhost:3000", "https://b.example"):
            preflight = httpx.options(
                url,
                headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
                timeout=30,
            )
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == origin
        listed = httpx.get(url, headers={"Origin": "https://ui.example"}, timeout=30)
        assert listed.headers["access-control-allow-origin"] == "https://ui.example"
        assert {"policy-id": "default_cpu"} in listed.json()
        other = httpx.get(url, headers={"Origin": "https://evil.example"}, timeout=30)
        assert "access-control-allow-origin" not in other.headers


def test_restful_as_refuses_an_origin_without_scheme() -> None:
    refused = _run("restful-as", "-s", f"127.0.0.1:{free_port()}", "-r", "ui.example")
    assert refused.returncode == 1
    assert "invalid CORS origin 'ui.example'" in refused.stderr
