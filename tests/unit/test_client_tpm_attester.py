"""The tpm attester's choices and failures, short of a TPM (tests/e2e/test_e2e_tpm.py quotes
swtpm): which TPM it picks, and one clear error for each thing that is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from keybroker.cli.kbs_client import main
from keybroker.client.tpm_attester import DEFAULT_AK_HANDLE, TpmAttester
from keybroker.errors import ClientError


@pytest.fixture(autouse=True)
def _no_tpm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TPM2TOOLS_TCTI", "AA_TPM_DEVICE", "AA_TPM_AK_HANDLE"):
        monkeypatch.delenv(name, raising=False)


def test_device_from_upstream_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    device = tmp_path / "tpm0"
    device.touch()
    monkeypatch.setenv("AA_TPM_DEVICE", str(device))
    monkeypatch.setenv("AA_TPM_AK_HANDLE", "0x81010005")
    attester = TpmAttester()
    assert attester._tcti == f"device:{device}"
    assert attester._ak_handle == 0x81010005


def test_missing_device_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AA_TPM_DEVICE", str(tmp_path / "absent"))
    with pytest.raises(ClientError, match="does not exist"):
        TpmAttester()


def test_bad_ak_handle_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AA_TPM_AK_HANDLE", "persistent")
    with pytest.raises(ClientError, match="not a hex handle"):
        TpmAttester(tcti="swtpm:port=1")


def test_tools_not_installed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    attester = TpmAttester(tcti="swtpm:host=127.0.0.1,port=1", ak_handle=DEFAULT_AK_HANDLE)
    with pytest.raises(ClientError, match="needs tpm2-tools"):
        attester.evidence(bytes(48))


def test_unreachable_tpm_is_one_line_from_the_tool() -> None:
    attester = TpmAttester(tcti="swtpm:host=127.0.0.1,port=1")  # nothing listens on port 1
    with pytest.raises(ClientError, match="tpm2_readpublic failed"):
        attester.evidence(bytes(48))


def test_init_data_digest_of_another_size_is_refused() -> None:
    with pytest.raises(ClientError, match="32-byte"):
        TpmAttester(tcti="swtpm:port=1").bind_init_data(bytes(48))


def test_cli_event_log_without_tpm_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attest", "--tpm-event-log", "/dev/null"]) == 1
    assert "--tpm-event-log needs --tee tpm" in capsys.readouterr().err
