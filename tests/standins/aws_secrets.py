"""STAND-INs for AWS Secrets Manager: moto's server as a real HTTP process, and a tiny throttler.

``MotoServer`` runs ``python -m moto.server`` (moto's own implementation of the Secrets Manager
JSON API) on a loopback port in a separate process; the production boto3 client in
``keybroker.storage.aws_secrets`` talks to it over HTTP. ``throttling_app`` answers every call
the way Secrets Manager answers when it throttles (HTTP 400, ``ThrottlingException`` in the
``x-amzn-ErrorType`` header and the JSON body), since moto never throttles.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ports import free_port

REGION = "us-east-1"


def aws_env(tmp_path: Path) -> dict[str, str]:
    """Dummy credentials for the standard chain (environment variables), and no other source:
    no shared files from the host, no instance metadata lookups."""
    return {
        "AWS_ACCESS_KEY_ID": "AKIASTANDINTESTING00",
        "AWS_SECRET_ACCESS_KEY": "stand-in-secret-access-key",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class MotoServer:
    """moto's server in its own process on a loopback port; ``stop()`` kills that process."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            if self._process.poll() is not None:
                raise AssertionError(f"moto server exited: {self._log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("moto server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
            self._process = None

    def admin(self, tmp_path: Path) -> Any:
        """A boto3 client for the test's own set-up of secrets (as an operator would, with AWS's
        tools)."""
        env = aws_env(tmp_path)
        return boto3.session.Session(
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
        ).client("secretsmanager", endpoint_url=self.url)

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Throttler:
    """Answers every call with Secrets Manager's throttling error and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def app(self) -> Starlette:
        async def any_call(request: Request) -> JSONResponse:
            self.calls += 1
            await request.body()
            return JSONResponse(
                {"__type": "ThrottlingException", "message": "Rate exceeded"},
                status_code=400,
                headers={"x-amzn-ErrorType": "ThrottlingException", "x-amzn-RequestId": "t-1"},
                media_type="application/x-amz-json-1.1",
            )

        return Starlette(routes=[Route("/", any_call, methods=["POST"])])
