"""The ``tpm`` attester: quotes a TPM 2.0 through tpm2-tools, as guest-components' does.

Evidence is upstream's (``{"tpm_quote": {signature, message, pcrs}, "ak_public"}``, see
:mod:`keybroker.verifiers.tpm.verifier`): a quote over the 24 SHA-256 PCRs by the attestation
key persisted at ``AA_TPM_AK_HANDLE`` (default ``0x81010002``), signed RSASSA/SHA-256, whose
qualifying data is the runtime-data digest cut or zero-padded to 32 bytes.

Why tpm2-tools in a subprocess rather than tpm2-pytss (docs/verifiers-tpm.md has the numbers):
tpm2-pytss ships only as source, so installing it needs libtss2-dev, pkg-config and a C
compiler on the guest; tpm2-tools is one Debian package, and a quote costs two short tool runs
(tens of milliseconds against swtpm, where a hardware TPM's own signature takes longer).

Which TPM: the ``tcti`` argument; else ``TPM2TOOLS_TCTI`` as the tools read it; else
``AA_TPM_DEVICE`` (upstream's variable); else the first of ``/dev/tpmrm0``, ``/dev/tpm0``,
``/dev/tpm1``, ``/dev/tpm2`` that exists.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess  # the tools run with fixed arguments, never through a shell
import tempfile
from pathlib import Path

from keybroker.client.attesters import Attester
from keybroker.errors import ClientError
from keybroker.protocol.models import JsonValue, Tee

DEFAULT_AK_HANDLE = 0x81010002  # upstream's
REPORT_DATA_SIZE = 32
INIT_DATA_PCR = 8
PCR_COUNT = 24
PCR_SIZE = 32
TOOL_TIMEOUT = 60.0  # seconds; a busy hardware TPM answers in well under one
DEVICES = ("/dev/tpmrm0", "/dev/tpm0", "/dev/tpm1", "/dev/tpm2")


def _default_tcti() -> str | None:
    if os.environ.get("TPM2TOOLS_TCTI"):
        return None  # the tools read it themselves
    device = os.environ.get("AA_TPM_DEVICE")
    if device:
        if not Path(device).exists():
            raise ClientError(f"AA_TPM_DEVICE is {device}, which does not exist")
        return f"device:{device}"
    found = next((d for d in DEVICES if Path(d).exists()), None)
    if found is None:
        raise ClientError(f"no TPM found (none of {', '.join(DEVICES)}; set AA_TPM_DEVICE)")
    return f"device:{found}"


def _default_ak_handle() -> int:
    text = os.environ.get("AA_TPM_AK_HANDLE")
    if not text:
        return DEFAULT_AK_HANDLE
    try:
        return int(text.removeprefix("0x"), 16)
    except ValueError:
        raise ClientError(f"AA_TPM_AK_HANDLE {text!r} is not a hex handle") from None


class TpmAttester(Attester):
    tee = Tee.TPM

    def __init__(
        self,
        *,
        tcti: str | None = None,
        ak_handle: int | None = None,
        event_log: Path | None = None,
    ) -> None:
        self._tcti = tcti if tcti is not None else _default_tcti()
        self._ak_handle = ak_handle if ak_handle is not None else _default_ak_handle()
        self._event_log = event_log

    def _run(self, *args: str) -> None:
        tool = shutil.which(args[0])
        if tool is None:
            raise ClientError(f"{args[0]} not found: the tpm attester needs tpm2-tools")
        env = dict(os.environ)
        if self._tcti is not None:
            env["TPM2TOOLS_TCTI"] = self._tcti
        try:
            done = subprocess.run(  # noqa: S603 -- fixed tool, arguments built here
                [tool, *args[1:]],
                env=env,
                capture_output=True,
                timeout=TOOL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ClientError(f"{args[0]} did not finish in {TOOL_TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            raise ClientError(f"{args[0]} failed: {lines[-1] if lines else done.returncode}")

    def evidence(self, report_data: bytes) -> JsonValue:
        nonce = report_data[:REPORT_DATA_SIZE].ljust(REPORT_DATA_SIZE, b"\0")
        handle = f"{self._ak_handle:#010x}"
        with tempfile.TemporaryDirectory(prefix="kbs-tpm-") as scratch:
            work = Path(scratch)
            self._run("tpm2_readpublic", "-c", handle, "-f", "der", "-o", str(work / "ak.der"))
            self._run(
                "tpm2_quote",
                *("-c", handle, "-l", "sha256:all", "-q", nonce.hex(), "-g", "sha256"),
                *("-m", str(work / "message"), "-s", str(work / "signature")),
                *("-o", str(work / "pcrs"), "-F", "values"),
            )
            ak_der = (work / "ak.der").read_bytes()
            message = (work / "message").read_bytes()
            signature = (work / "signature").read_bytes()
            pcrs = (work / "pcrs").read_bytes()
        if len(pcrs) != PCR_COUNT * PCR_SIZE:
            raise ClientError(f"tpm2_quote gave {len(pcrs)} bytes of PCR values, not 768")
        evidence: dict[str, JsonValue] = {
            "tpm_quote": {
                "signature": base64.b64encode(signature).decode(),
                "message": base64.b64encode(message).decode(),
                "pcrs": [pcrs[i : i + PCR_SIZE].hex() for i in range(0, len(pcrs), PCR_SIZE)],
            },
            "ak_public": base64.b64encode(ak_der).decode(),
        }
        if self._event_log is not None:
            try:
                log = self._event_log.read_bytes()
            except OSError as e:
                raise ClientError(f"cannot read the event log {self._event_log}: {e}") from None
            evidence["event_log"] = base64.b64encode(log).decode()
        return evidence

    def bind_init_data(self, digest: bytes) -> None:
        """Extend PCR 8 with the init-data digest, once per boot, as upstream's agent does."""
        if len(digest) != PCR_SIZE:
            raise ClientError(f"a TPM binds a 32-byte init-data digest, not {len(digest)} bytes")
        self._run("tpm2_pcrextend", f"{INIT_DATA_PCR}:sha256={digest.hex()}")
