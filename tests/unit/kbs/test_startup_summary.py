"""The start-up line names where resources really live."""

from __future__ import annotations

import pytest

from conftest import kbs_config
from keybroker.kbs.server import WORKER_HEALTHCHECK_SECONDS, startup_summary, uvicorn_config


@pytest.mark.parametrize(
    ("plugins", "expected"),
    [
        (None, "resources: Memory;"),
        ([{"name": "resource", "storage_backend_type": "aws", "region": "eu-west-1"}], "aws;"),
        ([{"name": "resource", "storage_backend_type": "gcp", "project_id": "p"}], "gcp;"),
        (
            [{"name": "resource", "type": "LocalFs", "dir_path": "/srv/kbs/repo"}],
            "resources: LocalFs directory /srv/kbs/repo;",
        ),
        ([{"name": "sample", "item": "v"}], "resources: none (no resource plugin);"),
    ],
)
def test_startup_summary_names_the_secret_backend(
    plugins: list[dict[str, str]] | None, expected: str
) -> None:
    sections = {} if plugins is None else {"plugins": plugins}
    assert expected in startup_summary(kbs_config(**sections), "http")


def test_a_slow_starting_worker_gets_thirty_seconds_before_it_is_replaced() -> None:
    http = kbs_config().http_server
    config = uvicorn_config("keybroker.kbs.server:worker_app", 2, http)
    assert config.timeout_worker_healthcheck == WORKER_HEALTHCHECK_SECONDS == 30
