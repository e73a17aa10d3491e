"""Static checks of deploy/ and docker/ (no image can be built here: docs/deployment.md says
why): every config key, command, port, file path and build arg in the Dockerfile, compose
file and Kubernetes manifests must exist in the code and agree."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from conftest import kbs_config
from keybroker import build_targets
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.config import (
    AttestationServiceFileConfig,
    KbsConfig,
    RvpsFileConfig,
    load_as_config,
    load_config,
    load_rvps_config,
)
from keybroker.errors import ConfigError
from keybroker.kbs.app import create_app
from keybroker.kbs.resource_policy import builtin_policy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# Commands that serve gRPC: an image running them needs the grpc extra.
GRPC_COMMANDS = {"grpc-as", "rvps"}
SCRIPTS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
CONFIGS = {"kbs-config.toml", "kbs-passport-config.toml", "as-config.toml", "rvps-config.toml"}


ServiceConfig = KbsConfig | AttestationServiceFileConfig | RvpsFileConfig


def _configs(deploy: Path) -> tuple[dict[str, KbsConfig], dict[str, ServiceConfig]]:
    # the files as the deployment's containers read them, not with this test's environment
    # (whose SSL_CERT_FILE, say, would become the gRPC AS's CA path)
    kbs = {
        n: load_config(deploy / "config" / n, environ={})
        for n in ("kbs-config.toml", "kbs-passport-config.toml")
    }
    services: dict[str, ServiceConfig] = {
        "as-config.toml": load_as_config(deploy / "config" / "as-config.toml", environ={}),
        "rvps-config.toml": load_rvps_config(deploy / "config" / "rvps-config.toml"),
    }
    return kbs, services


def _paths(config: ServiceConfig) -> list[str]:
    """Every absolute file path a config names."""
    text = config.model_dump_json()
    return sorted(set(re.findall(r'"(/[^"\s]+)"', text)))


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _host(address: str) -> str:
    return address.removeprefix("http://").rsplit(":", 1)[0]


def _arg(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _mounted(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def _commands(deploy: Path, compose: dict[str, Any]) -> list[str]:
    found = [
        f"compose {name}: no command {service['entrypoint'][0]!r} in pyproject scripts"
        for name, service in compose.items()
        if service["entrypoint"][0] not in SCRIPTS | {"/bin/sh"}
    ]
    dockerfile = (deploy / "Dockerfile").read_text()
    entry = re.search(r'ENTRYPOINT \["([^"]+)"', dockerfile)
    if entry is None or entry.group(1) not in SCRIPTS:
        found.append("Dockerfile ENTRYPOINT is not a Keybroker command")
    if "USER 10001" not in dockerfile or "HEALTHCHECK" not in dockerfile:
        found.append("Dockerfile must run as a non-root user and have a HEALTHCHECK")
    if len(re.findall(r"^FROM ", dockerfile, re.M)) < 2:
        found.append("Dockerfile must be multi-stage")
    return found


def _build_stage(dockerfile: str) -> str:
    """From the first ``FROM`` to the next."""
    return dockerfile.split("\nFROM ")[1]


def _image_plan(args: dict[str, str]) -> build_targets.Plan:
    assignments = [f"{name}={value}" for name, value in args.items()]
    return build_targets.plan("background-check-kbs", build_targets.parse_assignments(assignments))


def _build_args(dockerfile: str, compose: dict[str, Any]) -> list[str]:
    """The image's build args are scripts/build-kbs's switches, all passed on, with defaults
    it accepts; compose builds the image with grpc when it runs grpc-as or rvps."""
    found: list[str] = []
    stage = _build_stage(dockerfile)
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", stage, re.M))
    run = re.search(r"^RUN python scripts/build-kbs background-check-kbs (.*)", stage, re.M | re.S)
    if run is None:
        return ["Dockerfile build stage does not install with scripts/build-kbs"]
    passed = set(re.findall(r'\b(\w+)="\$\{(\w+)\}"', run.group(1)))
    # the client's switches are not the image's; ARCH is docker buildx build --platform
    switches = set(build_targets.SWITCHES) - {*build_targets.CLIENT_SWITCHES, "ARCH"}
    found += [f"Dockerfile ARG {n} is no build-kbs switch" for n in sorted(set(args) - switches)]
    found += [f"Dockerfile has no ARG {n}" for n in sorted(switches - set(args))]
    found += [
        f"Dockerfile does not pass {n} to build-kbs"
        for n in sorted(switches)
        if (n, n) not in passed
    ]
    try:
        _image_plan(args)
    except build_targets.BuildError as error:
        found.append(f"Dockerfile defaults: {error}")
    image = next(s for s in compose.values() if "build" in s)["build"]
    serves_grpc = {s["entrypoint"][0] for s in compose.values()} & GRPC_COMMANDS
    try:
        extras = _image_plan({**args, **image.get("args", {})}).extras
    except build_targets.BuildError as error:
        return [*found, f"compose build args: {error}"]
    if serves_grpc and "grpc" not in extras:
        found.append(f"compose runs {', '.join(sorted(serves_grpc))} from an image without grpc")
    return found


def problems(deploy: Path) -> list[str]:
    found: list[str] = []
    kbs_configs, service_configs = _configs(deploy)
    kbs = kbs_configs["kbs-config.toml"]
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())["services"]
    setup_creates = set(re.findall(r'"\$KEYS/([\w.-]+)"', (deploy / "setup.sh").read_text()))

    found += _commands(deploy, compose)
    found += _build_args((deploy / "Dockerfile").read_text(), compose)

    # ports and addresses agree
    kbs_port = _port(kbs.http_server.sockets[0])
    if f"{kbs_port}:{kbs_port}" not in compose["kbs"].get("ports", []):
        found.append(f"compose kbs does not publish the configured port {kbs_port}")
    service = kbs.attestation_service
    as_addr, rvps_addr = getattr(service, "as_addr", ""), getattr(service, "rvps_addr", "")
    for host, address, flag in (("as", as_addr, "-s"), ("rvps", rvps_addr, "-a")):
        if _host(address) not in compose:
            found.append(f"kbs config points at {address}: no compose service {_host(address)}")
        elif _port(_arg(compose[_host(address)]["entrypoint"], flag)) != _port(address):
            found.append(f"compose {host} listens elsewhere than kbs config's {address}")
    as_config = service_configs["as-config.toml"]
    assert isinstance(as_config, AttestationServiceFileConfig)
    as_rvps = as_config.rvps_config
    if getattr(as_rvps, "address", rvps_addr) != rvps_addr:
        found.append("as-config and kbs-config name different RVPS addresses")

    # every file the configs name is mounted, and every key is made by setup
    mounts: dict[str, list[ServiceConfig]] = {
        "kbs": list(kbs_configs.values()),
        "as": [service_configs["as-config.toml"]],
        "rvps": [service_configs["rvps-config.toml"]],
    }
    for name, configs in mounts.items():
        targets = [v.split(":")[1] for v in compose[name].get("volumes", [])]
        for config in configs:
            for path in _paths(config):
                if not _mounted(path, targets):
                    found.append(f"compose {name}: {path} is not on a mounted volume")
                if path.startswith("/keys/") and Path(path).name not in setup_creates:
                    found.append(f"{path} is not created by setup.sh")
    found += _kubernetes(deploy, kbs_port, as_addr, rvps_addr, mounts)
    return found


def _kubernetes(
    deploy: Path, kbs_port: int, as_addr: str, rvps_addr: str, mounts: dict[str, Any]
) -> list[str]:
    found: list[str] = []
    documents: list[dict[str, Any]] = []
    for file in sorted((deploy / "kubernetes").rglob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(file.read_text()) if d]
    deployments = {d["metadata"]["name"]: d for d in documents if d.get("kind") == "Deployment"}
    services = {d["metadata"]["name"]: d for d in documents if d.get("kind") == "Service"}
    expected = {"kbs": kbs_port, "as": _port(as_addr), "rvps": _port(rvps_addr)}
    for name, port in expected.items():
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        if container["command"][0] not in SCRIPTS:
            found.append(f"k8s {name}: no command {container['command'][0]!r}")
        if container["ports"][0]["containerPort"] != port:
            found.append(f"k8s {name}: containerPort is not {port}")
        if services[name]["spec"]["ports"][0]["targetPort"] != port:
            found.append(f"k8s service {name}: targetPort is not {port}")
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                found.append(f"k8s {name}: no {probe}")
        targets = [m["mountPath"] for m in container.get("volumeMounts", [])]
        for config in mounts[name]:
            for path in _paths(config):
                if not _mounted(path, targets):
                    found.append(f"k8s {name}: {path} is not on a mounted volume")
    probe = deployments["kbs"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    if probe["httpGet"]["path"] != "/healthz":
        found.append("k8s kbs: readiness probe must call /healthz")
    return found


def test_deploy_artifacts_agree_with_the_code() -> None:
    assert problems(DEPLOY) == []


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    return copy


def test_a_wrong_port_is_caught(broken: Path) -> None:
    config = broken / "config" / "kbs-config.toml"
    config.write_text(config.read_text().replace("0.0.0.0:8080", "0.0.0.0:9090"))
    found = problems(broken)
    assert any("does not publish the configured port 9090" in p for p in found)
    assert any("containerPort is not 9090" in p for p in found)


def test_an_unmounted_path_is_caught(broken: Path) -> None:
    config = broken / "config" / "as-config.toml"
    config.write_text(config.read_text().replace("/var/lib/keybroker/as", "/srv/keybroker/as"))
    found = problems(broken)
    assert "compose as: /srv/keybroker/as is not on a mounted volume" in found
    assert "k8s as: /srv/keybroker/as is not on a mounted volume" in found


def test_an_unknown_config_key_is_caught(broken: Path) -> None:
    config = broken / "config" / "kbs-config.toml"
    config.write_text(config.read_text().replace("insecure", "x") + "\n[http_server2]\n")
    with pytest.raises(ConfigError, match="http_server2"):
        problems(broken)


def test_a_missing_command_is_caught(broken: Path) -> None:
    compose = broken / "docker-compose.yml"
    compose.write_text(compose.read_text().replace('["grpc-as"', '["grpc-as-server"'))
    assert any("no command 'grpc-as-server'" in p for p in problems(broken))


def test_deploy_dockerfile_is_the_one_dockerfile() -> None:
    assert (DEPLOY / "Dockerfile").is_symlink()
    assert (DEPLOY / "Dockerfile").resolve() == DOCKERFILE.resolve()
    assert not DOCKERFILE.is_symlink()


def test_an_unknown_build_arg_is_caught(broken: Path) -> None:
    dockerfile = broken / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("ARG REDIS=true", "ARG MEMCACHED=true"))
    found = problems(broken)
    assert "Dockerfile ARG MEMCACHED is no build-kbs switch" in found
    assert "Dockerfile has no ARG REDIS" in found


def test_a_build_arg_not_passed_on_is_caught(broken: Path) -> None:
    dockerfile = broken / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace(' VAULT="${VAULT}"', ""))
    assert "Dockerfile does not pass VAULT to build-kbs" in problems(broken)


def test_a_build_arg_default_build_kbs_refuses_is_caught(broken: Path) -> None:
    dockerfile = broken / "Dockerfile"
    # a value build-kbs refuses (AWS itself is buildable since the aws extra exists)
    dockerfile.write_text(dockerfile.read_text().replace("ARG AWS=false", "ARG AWS=maybe"))
    assert any(p.startswith("Dockerfile defaults: AWS=maybe") for p in problems(broken))


def test_compose_building_without_grpc_is_caught(broken: Path) -> None:
    compose = broken / "docker-compose.yml"
    compose.write_text(
        compose.read_text().replace("COCO_AS_INTEGRATION_TYPE: grpc", "VAULT: 'true'")
    )
    assert "compose runs grpc-as, rvps from an image without grpc" in problems(broken)


def test_the_default_image_is_upstreams_coco_as_builtin_with_vault_and_pkcs11() -> None:
    stage = _build_stage(DOCKERFILE.read_text())
    chosen = _image_plan(dict(re.findall(r"^ARG (\w+)=(.*)$", stage, re.M)))
    assert (chosen.as_type, chosen.integration) == ("coco-as", "builtin")
    assert chosen.extras == ("pkcs11", "postgres", "redis", "vault")


def test_every_config_file_is_checked() -> None:
    # deploy/config/examples/ is checked by test_example_configs.py
    assert {p.name for p in (DEPLOY / "config").iterdir() if p.is_file()} == CONFIGS


# --- the Grafana dashboard -------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "keybroker-kbs.json"
# labels Prometheus adds to every scraped series
_TARGET_LABELS = {"instance", "job"}


def _exprs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in _exprs(value)]
    if isinstance(node, list):
        return [e for value in node for e in _exprs(value)]
    return []


def _served() -> tuple[set[str], set[str]]:
    """The series names and label names a KBS serves, from a real scrape after a release."""
    with TestClient(create_app(kbs_config()), client=("127.0.0.1", 1)) as client:
        AdminClient("http://testserver", http=client).set_resource("default/key/one", b"x")
        AdminClient("http://testserver", http=client).set_resource_policy(
            builtin_policy("allow_all")
        )
        KbsClient("http://testserver", http=client).get_resource("default/key/one")
        text = client.get("/metrics").text
    names: set[str] = set()
    labels: set[str] = set()
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes[family.type])
        for sample in family.samples:
            labels.update(sample.labels)
    return names, labels


def test_grafana_dashboard_uses_only_served_metrics_and_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _exprs(dashboard)
    assert len(exprs) >= 10
    names, labels = _served()
    used = {name for expr in exprs for name in re.findall(r"\bkbs_[a-z_]+", expr)}
    assert used and used <= names, sorted(used - names)
    grouped = {
        label.strip()
        for expr in exprs
        for group in re.findall(r"\bby \(([^)]*)\)", expr)
        for label in group.split(",")
    }
    assert grouped <= labels | _TARGET_LABELS, sorted(grouped - labels - _TARGET_LABELS)
    # every metric we serve has a panel
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families == shown, sorted(families - shown)
