"""Reference values, attestation policies and policy explain from the ``kbs-client`` CLI."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from kbs_process import kbs_client, running_kbs
from ports import free_port

pytestmark = pytest.mark.e2e

NOT_CONTRAINDICATED = """package policy
import rego.v1
default allow := false
allow if {
    every _, submod in input.submods { submod["ear.status"] != "contraindicated" }
}
"""
GPU_POLICY = """package policy
import rego.v1
default hardware := 97
hardware := 2 if input.sampledevice.svn in query_reference_value("device_svn")
trust_claims := {"hardware": hardware}
"""


def test_reference_values_policies_and_explain_from_the_cli(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "kbs.toml"
    config.write_text(
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n'
        '[admin]\nauthorization_mode = "InsecureAllowAll"\n'
    )
    (tmp_path / "secret").write_bytes(b"device-bound secret")
    (tmp_path / "resource.rego").write_text(NOT_CONTRAINDICATED)
    (tmp_path / "gpu.rego").write_text(GPU_POLICY)

    def cli(*args: str) -> str:
        done = kbs_client("--url", url, *args)
        assert done.returncode == 0, f"{args}: {done.stderr}"
        return done.stdout

    def denied(*args: str) -> bool:
        done = kbs_client("--url", url, *args)
        return done.returncode == 1 and "403" in done.stderr

    with running_kbs(["-c", str(config)], tmp_path, url):
        cli(
            "config", "set-resource", "--path", "a/b/c", "--resource-file", str(tmp_path / "secret")
        )
        cli("config", "set-resource-policy", "--policy-file", str(tmp_path / "resource.rego"))
        assert denied("get-resource", "--path", "a/b/c")

        cli("config", "set-sample-reference-value", "svn", "1")
        cli("config", "set-sample-reference-value", "launch_digest", "abcde")
        cli(
            "config",
            "set-sample-reference-value",
            "major_version",
            "1",
            "--as-integer",
            "--as-single-value",
        )
        cli(
            "config",
            "set-sample-reference-value",
            "minimum_minor_version",
            "1",
            "--as-integer",
            "--as-single-value",
        )
        assert json.loads(cli("config", "get-reference-value", "--id", "svn")) == ["1"]
        assert json.loads(cli("config", "get-reference-value", "--id", "major_version")) == 1
        released = cli("get-resource", "--path", "a/b/c")
        assert base64.b64decode(released) == b"device-bound secret"

        # with a sample device, gpu0 must be trustworthy too
        assert denied("get-resource", "--path", "a/b/c", "--sample-device")
        cli(
            "config",
            "set-attestation-policy",
            "--policy-file",
            str(tmp_path / "gpu.rego"),
            "--id",
            "default_gpu",
        )
        cli("config", "set-sample-reference-value", "device_svn", "2")
        released = cli("get-resource", "--path", "a/b/c", "--sample-device")
        assert base64.b64decode(released) == b"device-bound secret"

        # explain a denial: the default resource policy refuses the sample TEE
        token = tmp_path / "token"
        token.write_text(cli("attest"))
        cli("config", "set-resource-policy", "--default")
        assert denied("get-resource", "--path", "a/b/c")
        explained = json.loads(
            cli(
                "config",
                "evaluate-policy",
                "--resource",
                "--token-file",
                str(token),
                "--path",
                "a/b/c",
            )
        )
        assert explained["decision"] == {"allow": False}
        assert explained["rules"]["from_sample_tee"] is True
        appraisal = json.loads(
            cli("config", "evaluate-policy", "--attestation", "--token-file", str(token))
        )
        assert appraisal["decision"]["status"] == "affirming"
