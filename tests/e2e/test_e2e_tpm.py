"""A guest with a TPM: swtpm (a real TPM 2.0 simulator, socket mode), tpm2-tools, the ``kbs``
process and ``kbs-client --tee tpm``, as an operator and a guest would use them.

Each test starts its own swtpm on free loopback ports with its own state directory, creates an
EK and an AK in it (persisted at upstream's AK handle), enrolls the AK in the KBS's trusted-AK
directory, registers reference values through the admin API and attests with real quotes.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from json_shapes import at, mutable_arr
from kbs_process import kbs_client, open_kbs_config, running_kbs, wait_listening
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.client.tpm_attester import DEFAULT_AK_HANDLE, TpmAttester
from keybroker.errors import ClientError
from keybroker.kbs.resource_policy import builtin_policy
from keybroker.protocol.models import JsonValue
from ports import free_port
from system_tools import require

pytestmark = pytest.mark.e2e

SECRET = b"a secret only a measured TPM guest gets"
PATH = "default/tpm/key"
KERNEL = hashlib.sha256(b"the kernel and initrd, as a UKI measures them").digest()
OTHER_AK_HANDLE = 0x81010003


@dataclass(frozen=True)
class Swtpm:
    tcti: str
    workdir: Path

    def tool(self, *args: str) -> str:
        require(args[0], "tpm2-tools")
        done = subprocess.run(
            list(args),
            cwd=self.workdir,
            env={"TPM2TOOLS_TCTI": self.tcti, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{args[0]}: {done.stderr}"
        return done.stdout

    def create_ak(self, handle: int, pem: Path) -> None:
        """An EK, then an AK under it (RSA, RSASSA-SHA256), persisted at ``handle``."""
        # swtpm holds three transient objects: flush what each tool leaves loaded
        self.tool("tpm2_createek", "-c", "ek.ctx", "-G", "rsa")
        self.tool("tpm2_flushcontext", "-t")
        self.tool(
            *("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256"),
            *("-s", "rsassa", "-u", str(pem), "-f", "pem"),
        )
        self.tool("tpm2_flushcontext", "-t")
        self.tool("tpm2_evictcontrol", "-C", "o", "-c", "ak.ctx", f"{handle:#010x}")
        self.tool("tpm2_flushcontext", "-t")

    def extend(self, pcr: int, digest: bytes) -> None:
        self.tool("tpm2_pcrextend", f"{pcr}:sha256={digest.hex()}")

    def pcr(self, index: int) -> str:
        out = self.tool("tpm2_pcrread", f"sha256:{index}")
        return out.strip().rsplit("0x", 1)[1].lower()


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    state = tmp_path / "tpm-state"
    state.mkdir()
    setup = subprocess.run(
        [
            *(str(require("swtpm_setup", "swtpm-tools")), "--tpm2", "--tpmstate", str(state)),
            *("--createek", "--pcr-banks", "sha256"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    server, control = free_port(), free_port()
    log = tmp_path / "swtpm.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(str(require("swtpm", "swtpm")), "socket", "--tpm2"),
                *("--tpmstate", f"dir={state}"),
                *("--server", f"type=tcp,port={server},bindaddr=127.0.0.1"),
                *("--ctrl", f"type=tcp,port={control},bindaddr=127.0.0.1"),
                *("--flags", "not-need-init,startup-clear"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(process, server, log)
        workdir = tmp_path / "tpm-tools"
        workdir.mkdir()
        yield Swtpm(f"swtpm:host=127.0.0.1,port={server}", workdir)
    finally:
        process.terminate()
        process.wait(timeout=15)


@dataclass(frozen=True)
class Kbs:
    url: str
    admin: AdminClient
    ak_public: str  # the enrolled AK, as the evidence and the ``trusted_aks`` value carry it


@pytest.fixture
def kbs(tmp_path: Path, swtpm: Swtpm) -> Iterator[Kbs]:
    aks = tmp_path / "trusted_ak_keys"
    aks.mkdir()
    swtpm.create_ak(DEFAULT_AK_HANDLE, aks / "ak.pub")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "kbs-config.toml"
    config.write_text(
        open_kbs_config(
            port,
            f"""[attestation_service]
type = "coco_as_builtin"

[attestation_service.verifier_config.tpm_verifier]
trusted_ak_keys_dir = "{aks}"
""",
        )
    )
    der = base64.b64decode(b"".join((aks / "ak.pub").read_bytes().splitlines()[1:-1]))
    with running_kbs(["-c", str(config)], tmp_path, url):
        admin = AdminClient(url)
        admin.set_resource(PATH, SECRET)
        yield Kbs(url, admin, base64.b64encode(der).decode())


def _get_resource(kbs: Kbs, swtpm: Swtpm, *extra: str) -> subprocess.CompletedProcess[str]:
    return kbs_client(
        *("--url", kbs.url, "get-resource", "--path", PATH, "--tee", "tpm", *extra),
        env={"TPM2TOOLS_TCTI": swtpm.tcti},
    )


def _register_measured_boot(kbs: Kbs, swtpm: Swtpm) -> None:
    swtpm.extend(11, KERNEL)
    kbs.admin.set_sample_reference_value("tpm_pcr11", [swtpm.pcr(11)])
    kbs.admin.set_sample_reference_value("trusted_aks", [kbs.ak_public])
    kbs.admin.set_resource_policy(builtin_policy("affirming"))


def test_tpm_guest_with_registered_pcrs_gets_the_secret(kbs: Kbs, swtpm: Swtpm) -> None:
    _register_measured_boot(kbs, swtpm)
    got = _get_resource(kbs, swtpm)
    assert got.returncode == 0, got.stderr
    assert base64.b64decode(got.stdout.strip()) == SECRET


def test_changed_pcr_against_the_reference_value_is_refused_by_policy(
    kbs: Kbs, swtpm: Swtpm
) -> None:
    _register_measured_boot(kbs, swtpm)
    swtpm.extend(11, hashlib.sha256(b"another kernel, booted after registration").digest())
    refused = _get_resource(kbs, swtpm)
    assert refused.returncode == 1
    assert "403" in refused.stderr and "Traceback" not in refused.stderr


class ForgedPcrs(TpmAttester):
    """A real quote, sent with PCR 11 replaced by the registered value (the quote covers
    another one)."""

    def __init__(self, tcti: str, pcr11: str) -> None:
        super().__init__(tcti=tcti)
        self._pcr11 = pcr11

    def evidence(self, report_data: bytes) -> JsonValue:
        evidence = super().evidence(report_data)
        mutable_arr(at(evidence, "tpm_quote", "pcrs"))[11] = self._pcr11
        return evidence


def test_quote_over_other_pcr_values_is_refused(kbs: Kbs, swtpm: Swtpm) -> None:
    _register_measured_boot(kbs, swtpm)
    registered = swtpm.pcr(11)
    swtpm.extend(11, hashlib.sha256(b"an unregistered kernel").digest())
    guest = KbsClient(kbs.url, attester=ForgedPcrs(swtpm.tcti, registered))
    with pytest.raises(ClientError, match="PCR digest"):
        guest.attest()


def test_ak_not_in_the_trusted_directory_is_refused(kbs: Kbs, swtpm: Swtpm, tmp_path: Path) -> None:
    swtpm.create_ak(OTHER_AK_HANDLE, tmp_path / "unenrolled.pem")
    guest = KbsClient(kbs.url, attester=TpmAttester(tcti=swtpm.tcti, ak_handle=OTHER_AK_HANDLE))
    with pytest.raises(ClientError, match="not one of the trusted AKs"):
        guest.attest()


def test_init_data_bound_in_pcr8_is_accepted_and_unbound_is_refused(
    kbs: Kbs, swtpm: Swtpm, tmp_path: Path
) -> None:
    init_data = 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"aa.toml" = "x = 1"\n'
    attester = TpmAttester(tcti=swtpm.tcti)
    unbound = KbsClient(kbs.url, attester=attester, init_data=init_data)
    with pytest.raises(ClientError, match="PCR 8"):
        unbound.attest()
    attester.bind_init_data(hashlib.sha256(init_data.encode()).digest())
    bound = KbsClient(kbs.url, attester=attester, init_data=init_data)
    assert bound.attest().count(".") == 2
