"""Resource paths, canonical JSON and the runtime-data digest."""

from __future__ import annotations

import hashlib

import pytest

from keybroker.errors import InvalidRequestPathError
from keybroker.protocol.canonical import HashAlgorithm, jcs, runtime_data, runtime_data_digest
from keybroker.protocol.resource_path import ResourcePath


@pytest.mark.parametrize("text", ["default/key/one", "a/b/c", "repo-1/type_2/tag.v1.0", "/a/b/c"])
def test_valid_resource_paths(text: str) -> None:
    path = ResourcePath.parse(text)
    assert str(path) == text.removeprefix("/")
    assert path.uri() == f"kbs:///{path}"
    assert ResourcePath.from_uri(path.uri()) == path


@pytest.mark.parametrize(
    "text",
    [
        "../b/c",
        "a/../c",
        "a/b/..",
        ".hidden/b/c",
        "a/b",
        "a/b/c/d",
        "a//c",
        "a/b/c d",
        "a/b/c%2Fd",
        "a/b/c\\d",
        "a/b/" + "x" * 256,
        "",
        "a/b/c/",
    ],
)
def test_path_traversal_and_malformed_paths_rejected(text: str) -> None:
    with pytest.raises(InvalidRequestPathError):
        ResourcePath.parse(text)


def test_uri_requires_kbs_scheme() -> None:
    assert ResourcePath.from_uri("kbs://example.org:8080/a/b/c") == ResourcePath("a", "b", "c")
    with pytest.raises(InvalidRequestPathError):
        ResourcePath.from_uri("https://a/b/c")


def test_jcs_is_rfc8785_not_sorted_dumps() -> None:
    # RFC 8785 sorts by UTF-16 code units and writes numbers the ECMAScript way
    assert jcs({"b": 1.0, "a": [1e21, 0.5], "\u20ac": "x", "\U0001f600": "y"}) == (
        '{"a":[1e+21,0.5],"b":1,"\u20ac":"x","\U0001f600":"y"}'.encode()
    )


def test_runtime_data_digest_matches_upstream_construction() -> None:
    jwk = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "AA", "y": "BB"}
    data = runtime_data("bm9uY2U=", jwk, "")
    expected_text = (
        '{"additional-evidence":"","nonce":"bm9uY2U=","tee-pubkey":'
        '{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"AA","y":"BB"}}'
    )
    assert jcs(data) == expected_text.encode()
    assert (
        runtime_data_digest(data, HashAlgorithm.SHA384)
        == hashlib.sha384(expected_text.encode()).digest()
    )
    device = runtime_data("n", jwk, None)
    assert "additional-evidence" not in device


def test_hash_algorithm_parse() -> None:
    assert HashAlgorithm.parse("SHA512") is HashAlgorithm.SHA512
    with pytest.raises(ValueError, match="unsupported hash algorithm"):
        HashAlgorithm.parse("md5")
