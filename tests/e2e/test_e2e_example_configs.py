"""The split topology of docs/deployment.md as plain processes, from the shipped examples
(deploy/config/examples/split-*.toml) and the key-making commands in their headers: rvps,
grpc-as and kbs on loopback (ports replaced with free ones), then a guest gets a secret."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from kbs_process import BIN, kbs_client, running_kbs, wait_listening
from ports import free_port

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "config" / "examples"
SECRET = b"released through the split topology"


def _run(workdir: Path, *command: str) -> None:
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@contextmanager
def _server(workdir: Path, port: int, name: str, *command: str) -> Iterator[None]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / command[0]), *command[1:]], cwd=workdir, stdout=out, stderr=out
        )
    try:
        wait_listening(process, port, log)
        yield
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_split_topology_from_the_shipped_examples(tmp_path: Path) -> None:
    rvps_port, as_port, kbs_port = free_port(), free_port(), free_port()
    ports = {"50003": str(rvps_port), "50004": str(as_port), "8080": str(kbs_port)}
    for name in ("split-rvps.toml", "split-as.toml", "split-kbs.toml"):
        text = (EXAMPLES / name).read_text()
        for fixed, free in ports.items():
            text = text.replace(f"127.0.0.1:{fixed}", f"127.0.0.1:{free}")
        (tmp_path / name).write_text(text)
    # the commands the examples' headers give
    _run(
        tmp_path,
        "kbs",
        "self-signed-cert",
        "--name",
        "keybroker-token-signer",
        "--key-out",
        "token-signer.key",
        "--cert-out",
        "token-signer.pem",
    )
    keygen = ["--private-key", "admin-key.pem", "--public-key", "admin-key.pub.pem"]
    _run(tmp_path, "kbs-client", "admin", "keygen", *keygen)
    token = ["--key", "admin-key.pem", "--role", "admin", "--issuer", "ops", "--out", "token"]
    _run(tmp_path, "kbs-client", "admin", "token", *token)
    (tmp_path / "secret").write_bytes(SECRET)
    url = f"http://127.0.0.1:{kbs_port}"
    with ExitStack() as stack:
        stack.enter_context(
            _server(
                tmp_path,
                rvps_port,
                "rvps",
                "rvps",
                "-c",
                "split-rvps.toml",
                "-a",
                f"127.0.0.1:{rvps_port}",
            )
        )
        stack.enter_context(
            _server(
                tmp_path,
                as_port,
                "grpc-as",
                "grpc-as",
                "-c",
                "split-as.toml",
                "-s",
                f"127.0.0.1:{as_port}",
            )
        )
        stack.enter_context(running_kbs(["-c", "split-kbs.toml"], tmp_path, url))
        for args in (
            ["set-resource", "--path", "default/split/one", "--resource-file", "secret"],
            ["set-resource-policy", "--allow-all"],
        ):
            done = kbs_client(
                "--url", url, "config", "--admin-token-file", "token", *args, cwd=tmp_path
            )
            assert done.returncode == 0, done.stderr
        got = kbs_client("--url", url, "get-resource", "--path", "default/split/one")
        assert got.returncode == 0, got.stderr
        assert base64.b64decode(got.stdout) == SECRET
