"""The one certificate path builder: CA constraints, critical extensions and the search bounds,
over a small test PKI (the real AMD, Intel and upstream x5c chains are in the verifier and
passport tests)."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509

from keybroker.errors import TokenVerificationError
from keybroker.protocol.x509chain import MAX_CHAIN_LENGTH, SIGNATURE_BUDGET, build_path
from pki import START, Issued, issue

NOW = START + datetime.timedelta(days=30)
UNKNOWN = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")


def _build(
    leaf: Issued, intermediates: list[Issued], anchors: list[Issued], **kwargs: int
) -> list[x509.Certificate]:
    return build_path(
        leaf.cert,
        [c.cert for c in intermediates],
        [a.cert for a in anchors],
        now=NOW,
        error=TokenVerificationError,
        what="the test chain",
        **kwargs,
    )


def _key_usage(*, key_cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def test_intermediates_in_any_order_with_decoys_and_repeats_build_the_path() -> None:
    root = issue("root")
    upper = issue("upper", root)
    lower = issue("lower", upper)
    leaf = issue("leaf", lower, ca=False)
    decoy = issue("upper")  # the name, not the key
    path = _build(leaf, [decoy, upper, lower, upper], [root])
    assert path == [leaf.cert, lower.cert, upper.cert, root.cert]
    assert _build(leaf, [lower], [upper]) == [leaf.cert, lower.cert, upper.cert]  # partial


def test_ca_without_key_cert_sign_is_refused() -> None:
    root = issue("root")
    signing_only = issue("intermediate", root, extensions=[(_key_usage(key_cert_sign=False), True)])
    leaf = issue("leaf", signing_only, ca=False)
    with pytest.raises(TokenVerificationError, match="does not allow keyCertSign"):
        _build(leaf, [signing_only], [root])
    allowed = issue("intermediate", root, extensions=[(_key_usage(key_cert_sign=True), True)])
    assert len(_build(issue("leaf", allowed, ca=False), [allowed], [root])) == 3


def test_issuer_that_is_not_a_ca_is_refused() -> None:
    root = issue("root")
    not_ca = issue("intermediate", root, ca=False)
    with pytest.raises(TokenVerificationError, match="intermediate is not a CA"):
        _build(issue("leaf", not_ca, ca=False), [not_ca], [root])


def test_path_length_exceeded_is_refused() -> None:
    root = issue("root", path_length=0)
    intermediate = issue("intermediate", root)
    leaf = issue("leaf", intermediate, ca=False)
    with pytest.raises(TokenVerificationError, match=r"root allows 0 CA .*pathLenConstraint"):
        _build(leaf, [intermediate], [root])
    assert _build(issue("leaf", root, ca=False), [], [root])[-1] == root.cert  # 0 is enough
    roomy = issue("root", path_length=1)
    below = issue("intermediate", roomy)
    assert len(_build(issue("leaf", below, ca=False), [below], [roomy])) == 3


@pytest.mark.parametrize("where", ["intermediate", "leaf"])
def test_unknown_critical_extension_is_refused(where: str) -> None:
    root = issue("root")
    critical = [(UNKNOWN, True)]
    intermediate = issue("intermediate", root, extensions=critical if where != "leaf" else ())
    leaf = issue("leaf", intermediate, ca=False, extensions=critical if where == "leaf" else ())
    with pytest.raises(TokenVerificationError, match=r"critical extension 1\.3\.6\.1\.4\.1\.55555"):
        _build(leaf, [intermediate], [root])
    tolerated = issue("intermediate", root, extensions=[(UNKNOWN, False)])
    assert len(_build(issue("leaf", tolerated, ca=False), [tolerated], [root])) == 3


def test_certificate_not_valid_at_the_injected_time_is_refused() -> None:
    root = issue("root")
    short = issue("intermediate", root, days=10)  # expired 20 days before NOW
    with pytest.raises(TokenVerificationError, match="intermediate is not valid at 2026-01-31"):
        _build(issue("leaf", short, ca=False), [short], [root])


def test_over_long_chain_is_refused_before_any_search() -> None:
    root = issue("root")
    chain = [issue(f"ca{i}", root) for i in range(MAX_CHAIN_LENGTH + 1)]
    leaf = issue("leaf", chain[0], ca=False)
    with pytest.raises(TokenVerificationError, match=f"at most {MAX_CHAIN_LENGTH} are accepted"):
        _build(leaf, chain, [root], budget=0)  # not one signature check is needed to refuse


def test_loop_of_same_name_same_key_cas_is_refused_within_budget() -> None:
    """CAs that share a name and a key are each a valid issuer of every other (and of
    themselves): an unbounded search tries every ordering. Each (subject, key) is used once per
    path, so the search below needs one signature check per candidate, then gives up."""
    shared = issue("loop CA", issuer_name="loop CA")
    loop = [
        issue("loop CA", key=shared.key, issuer_name="loop CA") for _ in range(MAX_CHAIN_LENGTH - 1)
    ]
    leaf = issue("leaf", shared, ca=False)
    with pytest.raises(TokenVerificationError) as refused:
        _build(leaf, [shared, *loop], [issue("root")], budget=MAX_CHAIN_LENGTH)
    assert "does not lead to a trusted certificate" in refused.value.detail
    assert "gave up" not in refused.value.detail


def test_signature_budget_ends_the_search_fail_closed() -> None:
    root = issue("root")
    intermediate = issue("intermediate", root)
    leaf = issue("leaf", intermediate, ca=False)
    assert SIGNATURE_BUDGET >= 2
    with pytest.raises(TokenVerificationError, match="gave up after 1 signature checks"):
        _build(leaf, [intermediate], [root], budget=1)


def test_copy_of_the_anchor_in_the_chain_is_not_what_is_trusted() -> None:
    root = issue("root")
    leaf = issue("leaf", root, ca=False)
    forged_root = issue("root")  # carried with the chain, same name, another key
    forged_leaf = issue("leaf", forged_root, ca=False)
    assert _build(leaf, [root], [root]) == [leaf.cert, root.cert]
    with pytest.raises(TokenVerificationError, match="does not verify against the root"):
        _build(forged_leaf, [forged_root], [root])


def test_no_anchors_refuse_everything() -> None:
    leaf = issue("leaf", ca=False)
    with pytest.raises(TokenVerificationError, match="no trusted certificates"):
        _build(leaf, [], [])
