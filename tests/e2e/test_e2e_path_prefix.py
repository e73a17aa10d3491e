"""A KBS served under a path prefix by a reverse proxy (nginx maps ``/tenant-a/*`` to the
KBS's ``/*``): a guest whose URL carries the prefix completes the handshake and gets its
secret. The session cookie has no ``Path`` (as upstream), so the guest's cookie jar sends it
back under the prefix; with ``Path=/kbs/v0`` it never would, and ``/attest`` answered 401."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kbs_process import running_kbs
from keybroker.client.admin import AdminClient
from keybroker.client.rcar import KbsClient
from keybroker.kbs.resource_policy import builtin_policy
from nginx import running_nginx
from ports import free_port

pytestmark = pytest.mark.e2e

SECRET = b"served under a prefix"
PREFIX = "/tenant-a"


def test_a_guest_attests_through_a_proxy_that_maps_a_path_prefix(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "kbs.toml"
    config.write_text(
        f'[http_server]\nsockets = ["127.0.0.1:{port}"]\ninsecure_http = true\n\n'
        '[admin]\nauthorization_mode = "InsecureAllowAll"\n\n'
        '[attestation_service]\ntype = "coco_as_builtin"\n\n'
        '[storage_backend]\nstorage_type = "Memory"\n'
    )
    direct = f"http://127.0.0.1:{port}"
    proxy_dir = tmp_path / "nginx"
    proxy_dir.mkdir()
    with (
        running_kbs(["-c", str(config)], tmp_path, direct),
        running_nginx(proxy_dir, [port], prefix=PREFIX) as url,
    ):
        assert url.endswith(PREFIX)
        admin = AdminClient(url)
        admin.set_resource("default/key/prefixed", SECRET)
        admin.set_resource_policy(builtin_policy("allow_all"))
        http = httpx.Client(base_url=url, timeout=60.0)
        guest = KbsClient(url, http=http)
        try:
            assert guest.get_resource("default/key/prefixed") == SECRET
            # the cookie jar scoped the cookie by the default path: the prefixed directory
            [cookie] = list(http.cookies.jar)
            assert cookie.name == "kbs-session-id" and cookie.path == f"{PREFIX}/kbs/v0"
        finally:
            guest.close()
