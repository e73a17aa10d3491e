"""Operator admin credentials: durations, key files, minted tokens."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from keybroker.client.admin_tokens import (
    generate_key_pair,
    load_signing_key,
    mint_admin_token,
    parse_duration,
)
from keybroker.errors import ClientError
from keybroker.protocol.jws import decode_unverified, verify_jwt


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "1w", "-5", "h", ""])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ClientError):
        parse_duration(text)


def test_key_pair_and_token(tmp_path: Path) -> None:
    files = generate_key_pair(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    assert stat.S_IMODE(files.private_key.stat().st_mode) == 0o600
    with pytest.raises(ClientError, match="exists"):
        generate_key_pair(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    key = load_signing_key(files.private_key)
    token = mint_admin_token(
        key, role="admin", ttl_seconds=60, issuer="ops", audience="kbs", now=1000
    )
    header, _ = decode_unverified(token)
    assert header["alg"] == "EdDSA"
    claims = verify_jwt(token, key.public_key(), now=1001)
    assert claims["role"] == "admin" and claims["exp"] == 1060
    assert claims["iss"] == "ops" and claims["aud"] == "kbs"
    with pytest.raises(ClientError):
        mint_admin_token(key, role="", ttl_seconds=60)
