"""The ``nebula-ca`` plugin's request checks and config keys (upstream's ``nebula_ca.rs``).

The end-to-end behaviour with a real ``kbs`` and ``nebula-cert`` is in
tests/e2e/test_e2e_nebula_ca.py; here each refused query has its own case.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import vector
from keybroker.config import KbsConfig, NebulaCaPluginConfig, load_config
from keybroker.errors import (
    BadRequestError,
    ConfigError,
    InvalidRequestPathError,
    ServiceUnavailableError,
)
from keybroker.plugins import nebula_ca
from keybroker.plugins.base import PluginRequest
from keybroker.plugins.nebula_ca import (
    MAX_LIST_ITEMS,
    MAX_NAME_LENGTH,
    CredentialParams,
    NebulaCaConfig,
    NebulaCaPlugin,
    SelfSignedCaConfig,
)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"name": "pod1", "ip": "1.2.3.4/21"}, ["-name", "pod1", "-ip", "1.2.3.4/21"]),
        (
            {"name": "pod1", "ip": "1.2.3.4/21", "duration": "8760h10m10s"},
            ["-name", "pod1", "-ip", "1.2.3.4/21", "-duration", "8760h10m10s"],
        ),
        (
            {"name": "pod1", "ip": "1.2.3.4/21", "groups": "server,ssh"},
            ["-name", "pod1", "-ip", "1.2.3.4/21", "-groups", "server,ssh"],
        ),
        (
            {"name": "pod1", "ip": "1.2.3.4/21", "subnets": "1.2.3.5/21,1.2.3.6/21"},
            ["-name", "pod1", "-ip", "1.2.3.4/21", "-subnets", "1.2.3.5/21,1.2.3.6/21"],
        ),
    ],
)
def test_a_credential_query_becomes_upstreams_sign_flags(
    query: dict[str, str], expected: list[str]
) -> None:
    assert CredentialParams.from_query(query).arguments() == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"name": "pod1"}, "required"),
        ({"ip": "10.0.0.1/24"}, "required"),
        ({"name": "pod1", "ip": "1.2"}, "IPv4 CIDR"),  # upstream passes it; nebula-cert fails
        ({"name": "pod1", "ip": "10.0.0.1"}, "IPv4 CIDR"),
        ({"name": "pod1", "ip": "10.0.0.300/24"}, "IPv4 CIDR"),
        ({"name": "pod1", "ip": "10.0.0.1/33"}, "IPv4 CIDR"),
        ({"name": "pod1", "ip": "fd00::1/64"}, "IPv4 CIDR"),
        ({"name": "pod1", "ip": "10.0.0.1/24 -ca-key /etc/x"}, "IPv4 CIDR"),
        ({"name": "x" * (MAX_NAME_LENGTH + 1), "ip": "10.0.0.1/24"}, "`name`"),
        ({"name": "", "ip": "10.0.0.1/24"}, "`name`"),
        ({"name": "-ca-key", "ip": "10.0.0.1/24"}, "`name`"),
        ({"name": "pod 1", "ip": "10.0.0.1/24"}, "`name`"),
        ({"name": "pod\n1", "ip": "10.0.0.1/24"}, "`name`"),
        ({"name": "pod1", "ip": "10.0.0.1/24", "duration": "1d"}, "`duration`"),
        ({"name": "pod1", "ip": "10.0.0.1/24", "duration": ""}, "`duration`"),
        ({"name": "pod1", "ip": "10.0.0.1/24", "duration": "-5h"}, "`duration`"),
        ({"name": "pod1", "ip": "10.0.0.1/24", "duration": "9999999999h"}, "`duration`"),
        ({"name": "pod1", "ip": "10.0.0.1/24", "groups": "a,,b"}, "empty item"),
        ({"name": "pod1", "ip": "10.0.0.1/24", "groups": "a b"}, "group"),
        (
            {"name": "pod1", "ip": "10.0.0.1/24", "groups": ",".join(["g"] * (MAX_LIST_ITEMS + 1))},
            f"at most {MAX_LIST_ITEMS}",
        ),
        ({"name": "pod1", "ip": "10.0.0.1/24", "groups": "g" * 10_000}, "too long"),
        ({"name": "pod1", "ip": "10.0.0.1/24", "subnets": "10.1.0.0/16,nope"}, "IPv4 CIDR"),
        ({"name": "pod1", "ip": "10.0.0.1/24", "ca-key": "elsewhere.key"}, "unknown parameter"),
    ],
)
def test_a_bad_credential_query_is_refused(query: dict[str, str], message: str) -> None:
    with pytest.raises(BadRequestError, match=re.escape(message)):
        CredentialParams.from_query(query)


def test_upstreams_nebula_example_config_loads(tmp_path: Path) -> None:
    text = vector("kbs", "docs-config.md").read_text()
    start = text.index("Using Nebula CA plugin:")
    block = text[start:].split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "kbs-config.toml"
    path.write_text(block)
    config = load_config(path)
    plugins = [p for p in config.plugins if isinstance(p, NebulaCaPluginConfig)]
    assert len(plugins) == 1
    settings = plugins[0].settings()
    assert isinstance(settings, NebulaCaConfig)
    assert settings.work_dir == Path("/opt/confidential-containers/kbs/nebula-ca")
    assert settings.ca_config.name == "Trustee Nebula CA plugin"


def test_both_spellings_of_the_ca_table_load_and_unknown_keys_are_refused() -> None:
    for table in ("ca_config", "self_signed_ca"):
        config = KbsConfig.model_validate(
            {"plugins": [{"name": "nebula-ca", table: {"name": "Mesh CA", "duration": "10h"}}]}
        )
        settings = config.plugins[0]
        assert isinstance(settings, NebulaCaPluginConfig)
        ca = settings.settings()
        assert isinstance(ca, NebulaCaConfig) and ca.ca_config.name == "Mesh CA"
    with pytest.raises(ValueError, match="work_directory"):
        KbsConfig.model_validate({"plugins": [{"name": "nebula-ca", "work_directory": "/x"}]})


def test_a_missing_nebula_cert_binary_stops_start_up(tmp_path: Path) -> None:
    config = NebulaCaConfig(work_dir=tmp_path, nebula_cert_bin_path=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="not found"):
        NebulaCaPlugin(config)


def test_a_half_present_ca_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca.crt").write_text("only the certificate")
    with pytest.raises(ConfigError, match="found only one"):
        NebulaCaPlugin(NebulaCaConfig(work_dir=tmp_path))


def test_only_get_credential_is_served(tmp_path: Path) -> None:
    plugin = NebulaCaPlugin(NebulaCaConfig(work_dir=tmp_path))
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    request = PluginRequest("GET", ("sign",), {"name": "pod1", "ip": "10.0.0.1/24"})
    assert plugin.methods(request) == ("GET",)
    with pytest.raises(InvalidRequestPathError):
        plugin.check(request)
    assert plugin.needs_encryption(request) and not plugin.requires_admin(request)


def test_a_request_outside_the_cas_ips_is_refused_by_nebula_cert(tmp_path: Path) -> None:
    ca = SelfSignedCaConfig(name="Limited CA", ips="10.9.0.0/16")
    plugin = NebulaCaPlugin(NebulaCaConfig(work_dir=tmp_path, ca_config=ca))
    inside = PluginRequest("GET", ("credential",), {"name": "pod1", "ip": "10.9.8.7/21"})
    answer = json.loads(asyncio.run(plugin.handle(inside)).body)
    assert bytes(answer["ca_crt"]) == (tmp_path / "ca" / "ca.crt").read_bytes()
    outside = PluginRequest("GET", ("credential",), {"name": "pod1", "ip": "192.168.1.1/24"})
    with pytest.raises(BadRequestError, match="nebula-cert refused to sign"):
        asyncio.run(plugin.handle(outside))
    assert not list(tmp_path.glob("credential-*"))  # removed after a failure too


def test_a_hanging_nebula_cert_answers_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # FAULT INJECTION: a wrapper around the real binary whose `sign` never finishes in time
    hanging = tmp_path / "hanging-nebula-cert"
    real = shutil.which("nebula-cert")
    hanging.write_text(f'#!/bin/sh\n[ "$1" = sign ] && exec sleep 30\nexec {real} "$@"\n')
    hanging.chmod(0o700)
    monkeypatch.setattr(nebula_ca, "SIGN_TIMEOUT_SECONDS", 0.5)
    plugin = NebulaCaPlugin(NebulaCaConfig(work_dir=tmp_path, nebula_cert_bin_path=str(hanging)))
    request = PluginRequest("GET", ("credential",), {"name": "pod1", "ip": "10.9.8.7/21"})
    with pytest.raises(ServiceUnavailableError, match="timed out"):
        asyncio.run(plugin.handle(request))


def test_an_unwritable_work_dir_stops_start_up(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="nebula-ca"):
        NebulaCaPlugin(NebulaCaConfig(work_dir=blocker / "nebula-ca"))
