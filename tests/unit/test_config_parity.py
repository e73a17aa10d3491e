"""Upstream's shipped config files load (issue 20 §3): the standalone RVPS's
``{storage, extractors}``, the AS configs with their stale keys, upstream's ``dcap_verifier``,
and YAML files for the KBS, the AS and the RVPS."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import vector
from keybroker.cli.rvps import _storage as rvps_storage
from keybroker.config import (
    STALE_KEYS,
    GrpcAsConfig,
    RvpsFileConfig,
    StorageType,
    load_as_config,
    load_config,
    load_rvps_config,
    parse_config,
)
from keybroker.errors import ConfigError, UnsupportedFeatureError
from keybroker.verifiers import build_verifiers
from keybroker.verifiers.intel.dcap_settings import DcapSettings, dcap_settings

# The chart's helpers (deployment/helm-chart/templates/_helpers.tpl) with its default values.
HELM_DEFAULTS = {
    "coco-trustee.storage.type": "LocalFs",
    "coco-trustee.storage.rvpsLocalDir": "/opt/confidential-containers/attestation-service/"
    "reference_values",
    "coco-trustee.storage.localJsonDir": "/opt/confidential-containers/trustee/local-json",
}
PCS = "https://api.trustedservices.intel.com/sgx/certification/v4/"


def render_helm_rvps(values: dict[str, str]) -> str:
    """The chart's ``rvps.json``: each ``{{ include "<helper>" . }}`` replaced by its value."""
    template = vector("rvps", "helm-rvps.json.template").read_text()
    rendered = re.sub(r'\{\{ include "([^"]+)" \. \}\}', lambda m: values[m[1]], template)
    assert "{{" not in rendered
    return rendered


def _stale_warnings(caplog: pytest.LogCaptureFixture) -> set[str]:
    return {
        match
        for record in caplog.records
        for match in re.findall(r"stale configuration key `([^`]+)`", record.getMessage())
    }


# --- the standalone RVPS -----------------------------------------------------------------------


def test_helm_rendered_rvps_json_loads(tmp_path: Path) -> None:
    path = tmp_path / "rvps.json"
    path.write_text(render_helm_rvps(HELM_DEFAULTS))
    config = load_rvps_config(path)
    assert config.storage.storage_type is StorageType.LOCAL_FS
    local_fs = config.storage.backends.local_fs
    assert local_fs is not None
    assert str(local_fs.dir_path) == HELM_DEFAULTS["coco-trustee.storage.rvpsLocalDir"]
    assert config.extractors is not None and config.extractors.swid_extractor is not None


def test_rvps_storage_is_the_configured_local_fs(tmp_path: Path) -> None:
    values = {**HELM_DEFAULTS, "coco-trustee.storage.rvpsLocalDir": str(tmp_path / "rv")}
    (tmp_path / "rvps.json").write_text(render_helm_rvps(values))
    storage = rvps_storage(load_rvps_config(tmp_path / "rvps.json")).get("reference_value")
    asyncio.run(storage.set("svn", b'{"value": 1}'))
    assert [path for path in (tmp_path / "rv").rglob("*") if path.is_file()]


def test_docker_compose_rvps_json_loads_with_its_stale_keys_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="keybroker.config"):
        config = load_rvps_config(vector("kbs", "config", "docker-compose", "rvps.json"))
    # upstream ignores this earlier form too, and keeps the values in memory
    assert config.storage.storage_type is StorageType.MEMORY
    assert _stale_warnings(caplog) == {"storage.type", "storage.file_path"}


def test_unknown_key_in_rvps_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rvps.json").write_text('{"storage": {}, "extractors": {"swid_extractr": {}}}')
    with pytest.raises(ConfigError, match=r"unknown key `extractors.swid_extractr`"):
        load_rvps_config(tmp_path / "rvps.json")


def test_builtin_rvps_extractors_are_checked_like_the_standalone_ones() -> None:
    upstream = {"type": "coco_as_builtin", "rvps_config": {"type": "BuiltIn"}}
    upstream["rvps_config"] = {"type": "BuiltIn", "extractors": {"swid_extractor": {}}}
    parse_config({"attestation_service": upstream})
    upstream["rvps_config"] = {"type": "BuiltIn", "extractors": {"swid": {}}}
    with pytest.raises(ConfigError, match=r"unknown key `attestation_service.rvps_config"):
        parse_config({"attestation_service": upstream})


def test_earlier_keybroker_rvps_spelling_still_loads_but_not_both(tmp_path: Path) -> None:
    earlier = RvpsFileConfig.model_validate({"storage_backend": {"storage_type": "Memory"}})
    assert earlier.storage.storage_type is StorageType.MEMORY
    (tmp_path / "both.json").write_text('{"storage": {}, "storage_backend": {}}')
    with pytest.raises(ConfigError, match="not both"):
        load_rvps_config(tmp_path / "both.json")


# --- the AS config: stale keys warned, unknown keys refused ------------------------------------


def test_example_with_tpm_verifier_loads_and_names_its_stale_broker_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = vector("attestation-service", "configs", "example_with_tpm_verifier.json")
    with caplog.at_level(logging.WARNING, logger="keybroker.config"):
        config = load_as_config(path)
    assert _stale_warnings(caplog) == {"attestation_token_broker.type"}
    assert config.verifier_config is not None
    assert config.verifier_config["tpm_verifier"]["max_trusted_ak_keys"] == 50


def test_cca_as_config_loads_and_names_policy_engine_and_policy_dir(
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = vector("attestation-service", "configs", "cca-as-config.json")
    with caplog.at_level(logging.WARNING, logger="keybroker.config"):
        config = load_as_config(path)
    assert _stale_warnings(caplog) == {"policy_engine", "attestation_token_broker.policy_dir"}
    assert config.rvps_config.type == "GrpcRemote"


@pytest.mark.parametrize(
    "parts",
    [
        ("attestation-service", "config.json"),
        ("attestation-service", "configs", "example1.json"),
        ("attestation-service", "configs", "example2.json"),
        ("kbs", "config", "docker-compose", "as-config.json"),
        ("kbs", "config", "kubernetes", "base", "as-config.json"),
    ],
)
def test_upstream_as_configs_load_without_warnings(
    parts: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="keybroker.config"):
        load_as_config(vector(*parts))
    assert not _stale_warnings(caplog)


def test_verifiers_build_from_upstream_verifier_sections() -> None:
    # the compose file's nvidia_verifier {type = "Remote"}, the tests' tpm_verifier
    for parts in (
        ("kbs", "config", "docker-compose", "as-config.json"),
        ("attestation-service", "configs", "example_with_tpm_verifier.json"),
    ):
        build_verifiers(load_as_config(vector(*parts)).verifier_config)


def test_unknown_key_inside_a_verifier_section_is_refused_when_verifiers_are_built() -> None:
    with pytest.raises(ConfigError, match="nvidia_verifier"):
        build_verifiers({"nvidia_verifier": {"type": "Remote", "typo": 1}})


def test_stale_broker_type_in_a_kbs_config_is_warned_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # as upstream's kbs/docs/self-signed-https.md writes it
    document = tomllib.loads(
        '[attestation_service]\ntype = "coco_as_builtin"\n'
        '[attestation_service.attestation_token_broker]\ntype = "Ear"\nduration_min = 5\n'
    )
    with caplog.at_level(logging.WARNING, logger="keybroker.config"):
        config = parse_config(document)
    assert _stale_warnings(caplog) == {"attestation_token_broker.type"}
    assert not isinstance(config.attestation_service, GrpcAsConfig)


def test_misspelled_verifier_section_is_refused(tmp_path: Path) -> None:
    (tmp_path / "as.json").write_text('{"verifier_config": {"tpm_verifer": {}}}')
    with pytest.raises(ConfigError, match=r"verifier_config.tpm_verifer"):
        load_as_config(tmp_path / "as.json")


def test_misspelled_verifier_section_in_a_kbs_config_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"verifier_config.dcap_verfier"):
        parse_config(
            {
                "attestation_service": {
                    "type": "coco_as_builtin",
                    "verifier_config": {"dcap_verfier": {}},
                }
            }
        )


def test_unknown_key_beside_the_stale_ones_is_still_refused(tmp_path: Path) -> None:
    (tmp_path / "as.json").write_text('{"policy_engine": "opa", "policy_engin": "opa"}')
    with pytest.raises(ConfigError, match=r"unknown key `policy_engin`"):
        load_as_config(tmp_path / "as.json")


def test_stale_keys_are_the_documented_ones() -> None:
    documented = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for key in STALE_KEYS:
        assert f"`{key}`" in documented


# --- upstream's dcap_verifier -------------------------------------------------------------------


def test_dcap_verifier_collateral_service_is_the_pccs() -> None:
    section = {"collateral_service": "https://pccs.internal:8081/sgx/certification/v4/"}
    settings = dcap_settings({"dcap_verifier": {**section, "tcb_update_type": "standard"}})
    assert settings == DcapSettings(
        collateral_service="https://pccs.internal:8081/sgx/certification/v4/",
        tcb_update="standard",
    )


def test_dcap_verifier_naming_intel_pcs_is_the_default() -> None:
    assert dcap_settings({"dcap_verifier": {"collateral_service": PCS}}) == DcapSettings()


def test_dcap_verifier_use_secure_cert_false_is_warned_and_tls_still_verified(
    caplog: pytest.LogCaptureFixture,
) -> None:
    section = {"collateral_service": "https://pccs.internal:8081", "use_secure_cert": False}
    with caplog.at_level(logging.WARNING):
        settings = dcap_settings({"dcap_verifier": section})
    assert "use_secure_cert = false is ignored" in caplog.text
    assert settings.insecure_http is False and settings.ca_cert is None
    assert dcap_settings({"dcap_verifier": {**section, "use_secure_cert": True}}) == settings


def test_dcap_verifier_offline_file_is_refused_with_the_alternative() -> None:
    section = {"collateral_service": "file:///var/lib/pcs/collateral.json"}
    with pytest.raises(UnsupportedFeatureError, match=r"dcap\.offline_dir"):
        dcap_settings({"dcap_verifier": section})


def test_dcap_verifier_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"dcap_verifier\] use_secure_certs"):
        dcap_settings({"dcap_verifier": {"collateral_service": PCS, "use_secure_certs": True}})


def test_dcap_and_dcap_verifier_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="not both"):
        dcap_settings({"dcap": {}, "dcap_verifier": {"collateral_service": PCS}})


def test_dcap_verifier_reaches_the_verifiers_when_they_are_built() -> None:
    with pytest.raises(UnsupportedFeatureError, match="file://"):
        build_verifiers({"dcap_verifier": {"collateral_service": "file:///x.json"}})


# --- YAML ---------------------------------------------------------------------------------------


def test_kbs_config_in_yaml_loads_like_its_toml(tmp_path: Path) -> None:
    toml_path = vector("kbs", "configs", "coco-as-grpc-1.toml")
    yaml_path = tmp_path / "kbs-config.yaml"
    yaml_path.write_text(yaml.safe_dump(tomllib.loads(toml_path.read_text())))
    assert load_config(yaml_path) == load_config(toml_path)


def test_as_config_in_yaml_loads_like_its_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    json_path = vector("attestation-service", "configs", "example_with_tpm_verifier.json")
    yml_path = tmp_path / "as-config.yml"
    yml_path.write_text(yaml.safe_dump(json.loads(json_path.read_text())))
    assert load_as_config(yml_path) == load_as_config(json_path)


def test_rvps_config_in_yaml_loads_like_its_json(tmp_path: Path) -> None:
    rendered = render_helm_rvps(HELM_DEFAULTS)
    (tmp_path / "rvps.json").write_text(rendered)
    (tmp_path / "rvps.yaml").write_text(yaml.safe_dump(json.loads(rendered)))
    assert load_rvps_config(tmp_path / "rvps.yaml") == load_rvps_config(tmp_path / "rvps.json")


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (tmp_path / "kbs.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases are not accepted"):
        load_config(tmp_path / "kbs.yaml")


def test_yaml_nested_too_deep_is_refused(tmp_path: Path) -> None:
    (tmp_path / "as.yaml").write_text("a: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(ConfigError, match="nested more than"):
        load_as_config(tmp_path / "as.yaml")


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rvps.yml").write_text("- storage\n")
    with pytest.raises(ConfigError, match="must hold a table"):
        load_rvps_config(tmp_path / "rvps.yml")


def test_yaml_typo_is_named_like_in_toml(tmp_path: Path) -> None:
    (tmp_path / "kbs.yaml").write_text("http_server:\n  insecure_htp: true\n")
    with pytest.raises(ConfigError, match=r"unknown key `http_server.insecure_htp`"):
        load_config(tmp_path / "kbs.yaml")
