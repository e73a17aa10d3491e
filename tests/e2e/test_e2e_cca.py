"""A real ``kbs`` process configured for Arm CCA local mode with upstream's trust-anchor and
reference-value stores; an SDK guest presenting CCA tokens over real HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from cca_tokens import (
    EXAMPLE_RIM,
    P_INSTANCE,
    RIM_REFERENCE_ID,
    RV_STORE,
    TA_STORE,
    CcaTestAttester,
    example_spec,
)
from kbs_process import running_kbs
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from ports import free_port

pytestmark = pytest.mark.e2e

SECRET = b"a key for the realm"
NOT_CONTRAINDICATED = """
package policy
import rego.v1
default allow := false
allow if input.submods.cpu0["ear.status"] != "contraindicated"
"""


def _config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "kbs-config.toml"
    config.write_text(
        f"""
[http_server]
sockets = ["127.0.0.1:{port}"]
insecure_http = true

[admin]
authorization_mode = "InsecureAllowAll"

[attestation_service]
type = "coco_as_builtin"

[attestation_service.verifier_config.cca]
type = "local"
ta-store = "{TA_STORE}"
rv-store = "{RV_STORE}"

[storage_backend]
storage_type = "LocalFs"
backends.local_fs.dir_path = "{tmp_path / "storage"}"

[[plugins]]
name = "resource"
storage_backend_type = "kvstorage"
"""
    )
    return config


def test_cca_realm_attests_to_a_kbs_process_and_gets_its_key(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running_kbs(["--config-file", str(_config(tmp_path, port))], tmp_path, url):
        admin = AdminClient(url)
        admin.set_resource("default/key/realm", SECRET)
        admin.set_resource_policy(NOT_CONTRAINDICATED)
        admin.set_sample_reference_value(RIM_REFERENCE_ID, [EXAMPLE_RIM])
        guest = KbsClient(url, attester=CcaTestAttester())
        assert guest.get_resource("default/key/realm") == SECRET

        # a platform whose CPAK nobody endorsed never gets a token
        rogue = example_spec().with_platform(**{f"k{P_INSTANCE}": b"\x01" + bytes(32)})
        stranger = KbsClient(url, attester=CcaTestAttester(rogue))
        with pytest.raises(KbsRejectedError) as rejected:
            stranger.get_resource("default/key/realm")
        assert rejected.value.http_status == 401
        assert "trust anchor store" in str(rejected.value)
