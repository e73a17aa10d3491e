"""The SDK's HTTP plumbing: one httpx client per KBS, and KBS errors turned into SDK errors."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

from keybroker.errors import ClientError, KbsConnectionError, KbsRejectedError

DEFAULT_TIMEOUT = 30.0


def make_http(url: str, cert_file: Path | None, timeout: float = DEFAULT_TIMEOUT) -> httpx.Client:
    verify: bool | ssl.SSLContext = True
    if cert_file is not None:
        try:
            verify = ssl.create_default_context(cafile=str(cert_file))
        except (OSError, ssl.SSLError) as e:
            raise ClientError(f"cannot use CA certificate file {cert_file}: {e}") from None
    return httpx.Client(base_url=url.rstrip("/"), verify=verify, timeout=timeout)


def _hint(http: httpx.Client, error: httpx.HTTPError) -> str:
    """What to try when TLS is what failed: the CA file, or the other scheme."""
    text = str(error)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return " (is the KBS's certificate signed by a CA you trust? pass it with --cert-file)"
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return " (the server did not answer TLS: is it plain http:// rather than https://?)"
    if isinstance(error, httpx.RemoteProtocolError) and http.base_url.scheme == "http":
        return " (the server did not answer plain HTTP: is it https://?)"
    return ""


def send(http: httpx.Client, method: str, path: str, **kwargs: object) -> httpx.Response:
    """Send a request; raise KbsConnectionError or KbsRejectedError unless it succeeded."""
    try:
        response = http.request(method, path, **kwargs)  # type: ignore[arg-type]
    except httpx.HTTPError as e:
        raise KbsConnectionError(
            f"cannot reach the KBS at {http.base_url}: {e}{_hint(http, e)}"
        ) from None
    if response.is_success:
        return response
    try:
        problem = response.json()
        detail = str(problem.get("detail", "")) or response.reason_phrase
        problem_type = str(problem.get("type", ""))
    except (ValueError, AttributeError):
        detail, problem_type = response.text[:200] or response.reason_phrase, ""
    raise KbsRejectedError(response.status_code, problem_type, detail)
