"""Upstream's make switches mapped to extras, refused with a reason, and the starter configs
each target writes (the make targets themselves run in tests/e2e/test_e2e_build_targets.py)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest

from keybroker.build_targets import (
    ITA_API_KEY_PLACEHOLDER,
    SWITCHES,
    BuildError,
    as_config,
    kbs_config,
    parse_assignments,
    plan,
)
from keybroker.config import (
    BuiltinAsConfig,
    GrpcAsConfig,
    IntelTaConfig,
    NoAsConfig,
    load_as_config,
    load_config,
)


def _plan(target: str, *assignments: str) -> tuple[str | None, str, tuple[str, ...]]:
    chosen = plan(target, parse_assignments(list(assignments)))
    return chosen.as_type, chosen.integration, chosen.extras


def test_upstream_defaults_are_the_builtin_coco_as_with_vault() -> None:
    assert _plan("background-check-kbs") == ("coco-as", "builtin", ("vault",))
    assert _plan("passport-issuer-kbs") == ("coco-as", "builtin", ("vault",))


def test_as_type_and_as_types_are_one_switch() -> None:
    for name in ("AS_TYPE", "AS_TYPES"):
        chosen = _plan("background-check-kbs", f"{name}=intel-trust-authority-as")
        assert chosen == ("intel-trust-authority-as", "builtin", ("vault",))
    same = _plan("background-check-kbs", "AS_TYPE=coco-as", "AS_TYPES=coco-as")
    assert same[0] == "coco-as"
    with pytest.raises(BuildError, match="disagree: set one of them"):
        plan("background-check-kbs", {"AS_TYPE": "coco-as", "AS_TYPES": "intel-trust-authority-as"})


def test_grpc_integration_and_aliyun_add_their_extras() -> None:
    assert _plan(
        "background-check-kbs", "COCO_AS_INTEGRATION_TYPE=grpc", "ALIYUN=true", "VAULT=false"
    ) == ("coco-as", "grpc", ("aliyun", "grpc"))


def test_external_plugin_adds_the_grpc_extra() -> None:
    chosen = _plan("background-check-kbs", "EXTERNAL_PLUGIN=true", "VAULT=false")
    assert chosen == ("coco-as", "builtin", ("grpc",))


def test_keybrokers_own_switches_add_their_extras() -> None:
    chosen = _plan("passport-resource-kbs", "PKCS11=true", "POSTGRES=true", "REDIS=true")
    assert chosen == (None, "builtin", ("pkcs11", "postgres", "redis", "vault"))


def test_an_empty_value_means_unset() -> None:
    assert _plan("background-check-kbs", "AS_TYPES=", "VAULT=") == (
        "coco-as",
        "builtin",
        ("vault",),
    )


def test_targets_with_the_same_extras_share_one_environment() -> None:
    names = {
        plan("cli", {}).venv_name,
        plan("passport-issuer-kbs", {"VAULT": "false"}).venv_name,
        plan("passport-resource-kbs", {"VAULT": "false"}).venv_name,
    }
    assert names == {"core"}
    assert plan("background-check-kbs", {}).venv_name == "vault"


@pytest.mark.parametrize(
    ("assignment", "accepted"),
    [
        ("AS_TYPES=sgx", "coco-as | intel-trust-authority-as"),
        ("AS_TYPE=coco_as", "coco-as | intel-trust-authority-as"),
        ("COCO_AS_INTEGRATION_TYPE=restful", "builtin | grpc"),
        ("ALIYUN=1", "true | false"),
        ("VAULT=yes", "true | false"),
        ("AWS=on", "true | false"),
    ],
)
def test_a_wrong_value_names_the_accepted_ones(assignment: str, accepted: str) -> None:
    with pytest.raises(
        BuildError, match=re.escape(f"{assignment}: accepted values are {accepted}")
    ):
        plan("background-check-kbs", parse_assignments([assignment]))


def test_an_unknown_target_or_switch_names_the_accepted_ones() -> None:
    with pytest.raises(BuildError, match=re.escape("background-check-kbs | passport-issuer-kbs")):
        plan("kbs", {})
    with pytest.raises(BuildError, match=f"accepted are {', '.join(SWITCHES)}"):
        parse_assignments(["FEATURES=pkcs11"])
    with pytest.raises(BuildError, match="expected NAME=value"):
        parse_assignments(["VAULT"])


@pytest.mark.parametrize(
    ("target", "switches", "message"),
    [
        ("passport-resource-kbs", {"AS_TYPES": "coco-as"}, "has no attestation service"),
        ("cli", {"COCO_AS_INTEGRATION_TYPE": "grpc"}, "is the client only"),
        ("cli", {"VAULT": "true"}, "builds the client, with no backends"),
        ("cli", {"ATTESTER": "tdx-attester"}, "nothing to select"),
        ("cli", {"CLI_FEATURES": "sample_only"}, "nothing to select"),
        (
            "background-check-kbs",
            {"AS_TYPES": "intel-trust-authority-as", "COCO_AS_INTEGRATION_TYPE": "builtin"},
            "applies to AS_TYPES=coco-as",
        ),
    ],
)
def test_a_switch_that_does_not_apply_is_refused_not_ignored(
    target: str, switches: dict[str, str], message: str
) -> None:
    with pytest.raises(BuildError, match=message):
        plan(target, switches)


def test_arch_is_the_machine_running_the_build() -> None:
    machine = platform.machine()
    assert plan("cli", {"ARCH": machine}).extras == ()
    other = "s390x" if machine != "s390x" else "x86_64"
    with pytest.raises(BuildError, match=f"ARCH={other}: .*docker buildx build --platform"):
        plan("cli", {"ARCH": other})


def test_cli_installs_no_extra() -> None:
    assert _plan("cli") == (None, "builtin", ())


def _starter(tmp_path: Path, target: str, **switches: str) -> Path:
    out = tmp_path / target
    out.mkdir()
    config = out / "kbs-config.toml"
    signer = tmp_path / "keys" / "token-signer.pem"
    config.write_text(kbs_config(plan(target, switches), out, signer, "127.0.0.1:18080", "x:1"))
    return config


def test_the_builtin_starter_config_loads_with_the_strict_parser(tmp_path: Path) -> None:
    config = load_config(_starter(tmp_path, "background-check-kbs"))
    assert isinstance(config.attestation_service, BuiltinAsConfig)
    assert config.admin.authorization_mode == "AuthenticatedAuthorization"
    assert config.http_server.sockets == ["127.0.0.1:18080"]
    assert config.audit.key_path == tmp_path / "background-check-kbs" / "keys" / "audit.key"


def test_the_grpc_starter_configs_point_at_each_other(tmp_path: Path) -> None:
    config = load_config(
        _starter(tmp_path, "background-check-kbs", COCO_AS_INTEGRATION_TYPE="grpc")
    )
    assert isinstance(config.attestation_service, GrpcAsConfig)
    assert config.attestation_service.as_addr == "http://x:1"
    signer = tmp_path / "keys" / "token-signer"
    assert config.attestation_token.trusted_certs_paths == [str(signer.with_suffix(".pem"))]
    (tmp_path / "as.toml").write_text(as_config(tmp_path, signer.with_suffix(".pem")))
    service = load_as_config(tmp_path / "as.toml")
    assert service.attestation_token_broker.signer is not None
    assert service.attestation_token_broker.signer.key_path == signer.with_suffix(".key")


def test_the_ita_starter_config_uses_upstreams_keys(tmp_path: Path) -> None:
    config = load_config(
        _starter(tmp_path, "background-check-kbs", AS_TYPES="intel-trust-authority-as")
    )
    service = config.attestation_service
    assert isinstance(service, IntelTaConfig)
    assert service.api_key == ITA_API_KEY_PLACEHOLDER
    assert service.allow_unmatched_policy is False
    assert config.attestation_token.trusted_jwk_sets == [service.certs_file]


def test_the_passport_resource_starter_config_trusts_the_issuers_signer(tmp_path: Path) -> None:
    config = load_config(_starter(tmp_path, "passport-resource-kbs"))
    assert isinstance(config.attestation_service, NoAsConfig)
    signer = tmp_path / "keys" / "token-signer.pem"
    assert config.attestation_token.trusted_certs_paths == [str(signer)]


def test_a_build_dir_toml_cannot_hold_is_refused(tmp_path: Path) -> None:
    odd = tmp_path / 'a"b'
    with pytest.raises(BuildError, match="cannot write"):
        kbs_config(plan("background-check-kbs", {}), odd, odd / "s.pem", "127.0.0.1:1", "x:1")


def test_aws_installs_the_aws_extra() -> None:
    assert "aws" in plan("background-check-kbs", {"AWS": "true"}).extras
    assert "aws" not in plan("background-check-kbs", {"AWS": "false"}).extras


def test_gcp_installs_the_gcp_extra() -> None:
    assert "gcp" in plan("background-check-kbs", {"GCP": "true"}).extras
    assert "gcp" not in plan("background-check-kbs", {"GCP": "false"}).extras


def test_the_nebula_ca_switch_adds_no_extra_and_names_the_tool_it_needs() -> None:
    chosen = plan("background-check-kbs", {"NEBULA_CA_PLUGIN": "true"})
    assert chosen.extras == ("vault",)
    assert any("nebula-cert" in note for note in chosen.notes)
    assert not plan("background-check-kbs", {"NEBULA_CA_PLUGIN": "false"}).notes
    with pytest.raises(BuildError, match=r"true \| false"):
        plan("background-check-kbs", {"NEBULA_CA_PLUGIN": "yes"})
    with pytest.raises(BuildError, match="NEBULA_CA_PLUGIN: make cli builds the client"):
        plan("cli", {"NEBULA_CA_PLUGIN": "true"})
