"""Upstream's build interface: every ``make`` target installs a KBS (or the client) that runs.

The targets run for real (make, scripts/build-kbs, pip into fresh virtual environments), with
pip limited to an offline wheelhouse of this environment's packages (tests/wheelhouse.py), so
what lands in each environment is what the target's extras ask for and nothing else. Targets
with the same extras share one environment, as they do for a user. Each starter config is
started with the environment's own ``kbs`` and used with its admin token.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kbs_process import kbs_client, running_kbs, wait_listening
from keybroker.build_targets import ITA_API_KEY_PLACEHOLDER, ITA_BASE_URL, ITA_CERTS_URL
from keybroker.client.rcar import KbsClient
from keybroker.config import GrpcAsConfig, IntelTaConfig, NoAsConfig, load_config
from keybroker.protocol.models import Tee
from ports import free_port
from recorded_quotes import RecordedQuoteAttester
from standins.ita import ItaStandIn, running_ita_standin
from wheelhouse import build_wheelhouse, pip_env

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"built-and-released"
# The module each optional extra brings (`aliyun` is empty: Keybroker speaks to KMS itself;
# `pqc`'s packages come with the core too, gmssl needs pycryptodomex, so no import can tell
# whether it was asked for: the PQC build is checked by serving an ML-KEM-768 guest instead).
EXTRA_MODULES = {
    "grpc": "grpc",
    "vault": "hvac",
    "pkcs11": "pkcs11",
    "postgres": "psycopg",
    "redis": "redis",
    "aws": "boto3",
    "gcp": "google.cloud.secretmanager_v1",
}

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _make(build: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            *args,
            f"PYTHON={sys.executable}",
            f"BUILD_DIR={build}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _built(done: subprocess.CompletedProcess[str]) -> str:
    """The one command the target printed."""
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.split("run it with:\n", 1)[1].strip().splitlines()
    assert len(lines) == 1, done.stdout
    return lines[0].strip()


def _imports(bin_dir: Path) -> set[str]:
    """The extras whose module imports in the environment of ``bin_dir``."""
    probe = (
        "import importlib, json, sys\n"
        "ok = []\n"
        "for name, module in json.loads(sys.argv[1]).items():\n"
        "    try:\n"
        "        importlib.import_module(module)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    ok.append(name)\n"
        "print(json.dumps(ok))\n"
    )
    done = subprocess.run(
        [str(bin_dir / "python"), "-c", probe, json.dumps(EXTRA_MODULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(json.loads(done.stdout))


def _admin(url: str, out: Path, client: Path, *args: str) -> None:
    done = kbs_client(
        "--url",
        url,
        "config",
        "--admin-token-file",
        str(out / "keys" / "admin-token"),
        *args,
        bin_dir=client,
    )
    assert done.returncode == 0, done.stderr


def _release(url: str, out: Path, client: Path, tmp: Path, *extra: str) -> bytes:
    """Store a secret with the starter config's admin token, allow it, fetch it as a guest."""
    (tmp / "secret").write_bytes(SECRET)
    _admin(
        url,
        out,
        client,
        "set-resource",
        "--path",
        "default/demo/key",
        "--resource-file",
        str(tmp / "secret"),
    )
    _admin(url, out, client, "set-resource-policy", "--allow-all")
    got = kbs_client(
        "--url", url, "get-resource", "--path", "default/demo/key", *extra, bin_dir=client
    )
    assert got.returncode == 0, got.stderr
    return base64.b64decode(got.stdout)


def test_every_make_target_builds_what_it_names_and_runs(tmp_path: Path) -> None:
    env = pip_env(build_wheelhouse(tmp_path / "wheels"))
    build = tmp_path / "build"
    venvs = build / "venvs"

    # make cli: the client alone, no optional extra
    command = _built(_make(build, env, "cli"))
    client = venvs / "core" / "bin"
    assert command.startswith(f"{client / 'kbs-client'} ")
    assert _imports(client) == set()

    # upstream's default: builtin CoCo AS, VAULT on
    port = free_port()
    out = build / "background-check-kbs"
    command = _built(_make(build, env, "background-check-kbs", f"KBS_LISTEN=127.0.0.1:{port}"))
    vault = venvs / "vault" / "bin"
    assert command == f"{vault / 'kbs'} -c {out / 'kbs-config.toml'}"
    assert _imports(vault) == {"vault"}
    url = f"http://127.0.0.1:{port}"
    with running_kbs(["-c", str(out / "kbs-config.toml")], tmp_path, url, bin_dir=vault):
        assert _release(url, out, client, tmp_path) == SECRET
        # the starter admin API is not open: no token, no admin call
        unauthenticated = httpx.post(f"{url}/kbs/v0/resource-policy", json={"policy": ""})
        assert unauthenticated.status_code == 401

    # the grpc command, in upstream's other spelling of the AS switch, and upstream's
    # experimental post-quantum switch
    port, as_port = free_port(), free_port()
    command = _built(
        _make(
            build,
            env,
            "background-check-kbs",
            "AS_TYPE=coco-as",
            "COCO_AS_INTEGRATION_TYPE=grpc",
            "ALIYUN=true",
            "PQC_EXPERIMENTAL=true",
            f"KBS_LISTEN=127.0.0.1:{port}",
            f"AS_LISTEN=127.0.0.1:{as_port}",
        )
    )
    grpc = venvs / "aliyun-grpc-pqc-vault" / "bin"
    as_config = out / "as-config.toml"
    assert command == (
        f"{grpc / 'grpc-as'} -c {as_config} -s 127.0.0.1:{as_port} & "
        f"{grpc / 'kbs'} -c {out / 'kbs-config.toml'}"
    )
    assert _imports(grpc) == {"grpc", "vault"}
    config = load_config(out / "kbs-config.toml")
    assert isinstance(config.attestation_service, GrpcAsConfig)
    log = tmp_path / "grpc-as.log"
    with log.open("wb") as sink:
        grpc_as = subprocess.Popen(
            [str(grpc / "grpc-as"), "-c", str(as_config), "-s", f"127.0.0.1:{as_port}"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(grpc_as, as_port, log)
        url = f"http://127.0.0.1:{port}"
        with running_kbs(["-c", str(out / "kbs-config.toml")], tmp_path, url, bin_dir=grpc):
            assert _release(url, out, client, tmp_path) == SECRET  # attested through grpc-as
            pq = ("--tee-key-algorithm", "ML-KEM-768+A192KW")
            assert _release(url, out, client, tmp_path, *pq) == SECRET  # an AKP tee key
    finally:
        grpc_as.terminate()
        grpc_as.wait(timeout=15)

    # Intel Trust Authority: the starter config has upstream's keys and, with ITA's URLs and
    # the API key pointed at the stand-in (all an operator edits), attests a TDX guest
    port = free_port()
    done = _make(
        build,
        env,
        "background-check-kbs",
        "AS_TYPES=intel-trust-authority-as",
        f"KBS_LISTEN=127.0.0.1:{port}",
    )
    command = _built(done)
    assert command == f"{vault / 'kbs'} -c {out / 'kbs-config.toml'}"
    assert "set api_key in" in done.stdout
    config = load_config(out / "kbs-config.toml")
    assert isinstance(config.attestation_service, IntelTaConfig)
    assert config.attestation_service.base_url == ITA_BASE_URL
    assert config.attestation_token.trusted_jwk_sets == [config.attestation_service.certs_file]
    stand_in = ItaStandIn()
    with running_ita_standin(tmp_path, stand_in) as ita:
        starter = (out / "kbs-config.toml").read_text()
        (out / "kbs-config.toml").write_text(
            starter.replace(ITA_BASE_URL, ita.base_url)
            .replace(ITA_CERTS_URL, ita.jwks_url)
            .replace(ITA_API_KEY_PLACEHOLDER, ita.api_key)
        )
        url = f"http://127.0.0.1:{port}"
        ita_env = {"SSL_CERT_FILE": str(ita.ca_path)}
        with running_kbs(
            ["-c", str(out / "kbs-config.toml")], tmp_path, url, bin_dir=vault, env=ita_env
        ):
            (tmp_path / "secret").write_bytes(SECRET)
            _admin(
                url,
                out,
                client,
                "set-resource",
                "--path",
                "default/demo/key",
                "--resource-file",
                str(tmp_path / "secret"),
            )
            _admin(url, out, client, "set-resource-policy", "--allow-all")
            guest = KbsClient(url, attester=RecordedQuoteAttester(Tee.TDX))
            try:
                assert guest.get_resource("default/demo/key") == SECRET
            finally:
                guest.close()
        assert len(stand_in.requests) == 1  # the guest was appraised by the (stand-in) ITA

    # passport: the issuer signs, the resource KBS trusts that signer (VAULT=false: core)
    issuer_port, resource_port = free_port(), free_port()
    issuer_url, resource_url = (
        f"http://127.0.0.1:{issuer_port}",
        f"http://127.0.0.1:{resource_port}",
    )
    _built(
        _make(
            build, env, "passport-issuer-kbs", "VAULT=false", f"KBS_LISTEN=127.0.0.1:{issuer_port}"
        )
    )
    _built(
        _make(
            build,
            env,
            "passport-resource-kbs",
            "VAULT=false",
            f"KBS_LISTEN=127.0.0.1:{resource_port}",
        )
    )
    issuer, resource = build / "passport-issuer-kbs", build / "passport-resource-kbs"
    assert isinstance(load_config(resource / "kbs-config.toml").attestation_service, NoAsConfig)
    tee_key = tmp_path / "tee.pem"
    tee_key.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with (
        running_kbs(
            ["-c", str(issuer / "kbs-config.toml")],
            tmp_path,
            issuer_url,
            bin_dir=client,
            log_name="issuer.log",
        ),
        running_kbs(
            ["-c", str(resource / "kbs-config.toml")],
            tmp_path,
            resource_url,
            bin_dir=client,
            log_name="resource.log",
        ),
    ):
        _admin(issuer_url, issuer, client, "set-resource-policy", "--allow-all")
        attested = kbs_client(
            "--url", issuer_url, "attest", "--tee-key-file", str(tee_key), bin_dir=client
        )
        assert attested.returncode == 0, attested.stderr
        (tmp_path / "token").write_text(attested.stdout)
        released = _release(
            resource_url,
            resource,
            client,
            tmp_path,
            "--attestation-token",
            str(tmp_path / "token"),
            "--tee-key-file",
            str(tee_key),
        )
        assert released == SECRET
        auth = httpx.post(f"{resource_url}/kbs/v0/auth", json={"version": "0.4.0", "tee": "sample"})
        assert auth.status_code == 404  # no attestation service in a resource KBS
    assert _imports(client) == set()  # the passport targets added nothing to the shared core


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["background-check-kbs", "AS_TYPES=sgx"], "coco-as | intel-trust-authority-as"),
        (["background-check-kbs", "COCO_AS_INTEGRATION_TYPE=rest"], "builtin | grpc"),
        (["background-check-kbs", "ALIYUN=yes"], "true | false"),
        (["background-check-kbs", "AWS=on"], "true | false"),
        (["background-check-kbs", "NEBULA_CA_PLUGIN=yes"], "true | false"),
        (["cli", "ATTESTER=tdx-attester"], "nothing to select"),
        (["passport-resource-kbs", "AS_TYPES=coco-as"], "has no attestation service"),
    ],
)
def test_a_wrong_switch_is_refused_with_the_accepted_values(
    tmp_path: Path, args: list[str], named: str
) -> None:
    done = _make(tmp_path / "build", pip_env(tmp_path), *args)
    assert done.returncode != 0
    assert named in done.stderr
    assert not (tmp_path / "build").exists()  # refused before anything is installed
