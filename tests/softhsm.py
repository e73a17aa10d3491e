"""A SoftHSM2 token of the test session's own (Debian's softhsm2, installed by scripts/system-deps).

SoftHSM reads ``SOFTHSM2_CONF`` once, when a process first loads the module, so one token
directory serves the whole test session; tests keep apart by resource names. Child processes
(a ``kbs`` under test) get the same variable and see the same token.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from system_tools import require

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
LABEL = "keybroker-test"


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    module: Path
    pin: str

    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}


def init_token(directory: Path) -> SoftHsm:
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    pin = os.urandom(6).hex()
    os.environ["SOFTHSM2_CONF"] = str(conf)
    tool = str(require("softhsm2-util", "softhsm2", default="/usr/bin/softhsm2-util"))
    require(str(MODULE), "softhsm2")
    subprocess.run(
        [
            tool,
            "--init-token",
            "--free",
            "--label",
            LABEL,
            "--pin",
            pin,
            "--so-pin",
            os.urandom(6).hex(),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )
    return SoftHsm(conf, MODULE, pin)
