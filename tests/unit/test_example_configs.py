"""The example configs under deploy/config/examples/ load with the strict parsers, and every
file a KBS example names is one its header comment says how to make."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keybroker.config import KbsConfig, load_as_config, load_config, load_rvps_config

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "config" / "examples"
AS_FILES = {"split-as.toml"}  # grpc-as reads the AS file format
RVPS_FILES = {"split-rvps.toml"}  # rvps reads upstream's {storage, extractors}
# The key files an example may name, and the command that makes each (docs/deployment.md).
MADE_BY = {
    "tls.key": "kbs self-signed-cert",
    "tls.pem": "kbs self-signed-cert",
    "admin-key.pub.pem": "kbs-client admin keygen",
    "audit.key": "kbs audit keygen",
    "token-signer.key": "kbs self-signed-cert",
    "token-signer.pem": "kbs self-signed-cert",
}


def _examples() -> list[Path]:
    return sorted(EXAMPLES.glob("*.toml"))


def test_there_is_an_example_for_each_mode() -> None:
    names = {path.name for path in _examples()}
    assert {
        "one-process.toml",
        "split-kbs.toml",
        "split-as.toml",
        "split-rvps.toml",
        "passport-resource.toml",
        "scale-out.toml",
        "intel-trust-authority.toml",
    } <= names


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.name)
def test_example_loads(path: Path) -> None:
    if path.name in AS_FILES:
        load_as_config(path)
    elif path.name in RVPS_FILES:
        load_rvps_config(path)
    else:
        assert isinstance(load_config(path), KbsConfig)


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.name)
def test_every_key_file_an_example_names_has_a_known_maker(path: Path) -> None:
    text = path.read_text()
    named = set(re.findall(r'"([\w.-]+\.(?:key|pem))"', text))
    assert named <= set(MADE_BY), named - set(MADE_BY)
