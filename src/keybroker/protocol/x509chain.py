"""X.509 certification paths: does this leaf chain to a certificate we trust?

The one path builder of Keybroker, used for token signers (a JWS header's ``x5c``), Intel PCK
and collateral-signing chains, and AMD's VCEK/VLEK → ASK/ASVK → ARK chains. Pure: certificates,
anchors and a time in, the path (leaf first, anchor last) or an error out.

The intermediates are untrusted: they may come in any order, with decoys, and may repeat. A path
ends at an anchor: a certificate equal to an anchor, or one the anchor's key signed (so an anchor
may be a root or an intermediate: partial chains are accepted). Every certificate of the path is
valid at the injected ``now`` and carries no critical extension this module does not process.
Every issuer, anchors included, is a CA: basicConstraints ``cA`` true, ``keyCertSign`` when it
has a keyUsage, and no more CA certificates below it than its pathLenConstraint allows
(self-issued ones count too, stricter than RFC 5280).

Bounds, against an attacker who sends certificates built to make the search explode (say
eight CAs sharing one name and one key, each a valid issuer of every other): at most
:data:`MAX_CHAIN_LENGTH` untrusted certificates; a path of at most :data:`MAX_DEPTH`
certificates; no certificate and no (subject, key) pair twice on one path; and at most
:data:`SIGNATURE_BUDGET` signature checks per call, after which the call fails closed.

Why not ``cryptography.x509.verification`` (``PolicyBuilder``/``Store``): its policy accepts
only the CA/Browser Forum's exact signature AlgorithmIdentifiers, and AMD encodes RSA-PSS with
an explicit trailerField, so every real AMD chain is refused as a "forbidden signature
algorithm". One builder for all three users is better than the library for two and a second,
hand-written one for AMD.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID

from keybroker.errors import UnauthenticatedError

MAX_CHAIN_LENGTH = 4  # untrusted certificates beside the leaf (upstream's x5c: <= 4 in all)
MAX_DEPTH = 6  # certificates in one path, leaf and anchor included
SIGNATURE_BUDGET = 32  # signature checks per path search
# Critical extensions this module processes (basicConstraints, keyUsage) or that restrict
# nothing a chain decision depends on. Any other critical extension (name constraints,
# certificate policies, an unknown OID) refuses its certificate: we cannot honour it.
_UNDERSTOOD_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.EXTENDED_KEY_USAGE,
        # TCG DICE TcbInfo, UEID and MultiTcbInfo: the device's measurements, which DICE
        # verifiers (NVIDIA DPU) read themselves; they constrain no path
        x509.ObjectIdentifier("2.23.133.5.4.1"),
        x509.ObjectIdentifier("2.23.133.5.4.4"),
        x509.ObjectIdentifier("2.23.133.5.4.5"),
    }
)
_SHA256 = hashes.SHA256()
_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def build_path(
    leaf: x509.Certificate,
    unverified_intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    *,
    now: datetime,
    error: type[UnauthenticatedError],
    what: str,
    budget: int = SIGNATURE_BUDGET,
) -> list[x509.Certificate]:
    """The path from ``leaf`` to one of ``anchors``, leaf first; else ``error`` naming ``what``
    (e.g. "the PCK chain") and the reason the most promising attempt failed."""
    if not anchors:
        raise error(f"{what}: no trusted certificates are configured")
    if len(unverified_intermediates) > MAX_CHAIN_LENGTH:
        raise error(
            f"{what} carries {len(unverified_intermediates)} certificates beside its leaf, "
            f"at most {MAX_CHAIN_LENGTH} are accepted"
        )
    search = _Search(list(anchors), _distinct(unverified_intermediates, anchors), now, budget)
    problem = search.usable(leaf)
    if problem is None:
        path = search.extend([leaf], {_identity(leaf)})
        if path is not None:
            return path
        problem = search.failure or "no issuer verifies"
    raise error(f"{what} does not lead to a trusted certificate: {problem}")


def _name(cert: x509.Certificate | x509.Name) -> str:
    return (cert.subject if isinstance(cert, x509.Certificate) else cert).rfc4514_string()


def _distinct(
    certs: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """``certs`` without repeats and without copies of an anchor (the anchor itself ends a
    path; a copy carried in evidence adds nothing and is never what is trusted)."""
    seen = {anchor.fingerprint(_SHA256) for anchor in anchors}
    out = []
    for cert in certs:
        fingerprint = cert.fingerprint(_SHA256)
        if fingerprint not in seen:
            seen.add(fingerprint)
            out.append(cert)
    return out


def _identity(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """(subject, key): two certificates with both equal are the same CA for path building."""
    return cert.subject.public_bytes(), cert.public_key().public_bytes(_DER, _SPKI)


class _BudgetExhaustedError(Exception):
    pass


@dataclass
class _Search:
    anchors: list[x509.Certificate]
    pool: list[x509.Certificate]
    now: datetime
    budget: int
    checks: int = 0
    failure: str | None = None
    failure_depth: int = -1
    anchor_prints: frozenset[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.anchor_prints = frozenset(a.fingerprint(_SHA256) for a in self.anchors)

    def usable(self, cert: x509.Certificate) -> str | None:
        """Why ``cert`` cannot be on any path at ``now``, or None."""
        if not cert.not_valid_before_utc <= self.now <= cert.not_valid_after_utc:
            return f"{_name(cert)} is not valid at {self.now.isoformat()}"
        try:
            extensions = cert.extensions
        except ValueError as e:
            return f"{_name(cert)} has malformed extensions: {e}"
        for extension in extensions:
            if extension.critical and extension.oid not in _UNDERSTOOD_CRITICAL:
                return (
                    f"{_name(cert)} has a critical extension {extension.oid.dotted_string} "
                    "that Keybroker does not process"
                )
        return None

    def _note(self, depth: int, reason: str) -> None:
        """Keep the reason of the deepest failed attempt: the one closest to success."""
        if depth > self.failure_depth:
            self.failure, self.failure_depth = reason, depth

    def extend(
        self, path: list[x509.Certificate], on_path: set[tuple[bytes, bytes]]
    ) -> list[x509.Certificate] | None:
        try:
            return self._extend(path, on_path)
        except _BudgetExhaustedError:
            self.failure = f"gave up after {self.checks} signature checks"
            return None

    def _extend(
        self, path: list[x509.Certificate], on_path: set[tuple[bytes, bytes]]
    ) -> list[x509.Certificate] | None:
        cert = path[-1]
        if cert.fingerprint(_SHA256) in self.anchor_prints:
            return path
        below = len(path) - 1  # CA certificates already under the next issuer
        depth = len(path)
        named = [a for a in self.anchors if a.subject == cert.issuer]
        for anchor in named:
            if self._issues(anchor, cert, below, depth, is_anchor=True):
                return [*path, anchor]
        candidates = [
            c for c in self.pool if c.subject == cert.issuer and _identity(c) not in on_path
        ]
        if not named and not candidates:
            # names the issuer the certificate claims, never the trusted ones: the reason
            # reaches unauthenticated callers
            self._note(
                depth,
                f"{_name(cert)} is not issued by a trusted certificate nor by one of the chain "
                f"(its issuer: {_name(cert.issuer)})",
            )
        if len(path) + 2 > MAX_DEPTH and candidates:
            self._note(depth, f"no trusted certificate within {MAX_DEPTH} certificates")
            return None
        for candidate in candidates:
            problem = self.usable(candidate)
            if problem is not None:
                self._note(depth, problem)
                continue
            if not self._issues(candidate, cert, below, depth, is_anchor=False):
                continue
            found = self._extend([*path, candidate], on_path | {_identity(candidate)})
            if found is not None:
                return found
        return None

    def _issues(
        self,
        issuer: x509.Certificate,
        cert: x509.Certificate,
        below: int,
        depth: int,
        *,
        is_anchor: bool,
    ) -> bool:
        problem = (self.usable(issuer) if is_anchor else None) or _ca_problem(issuer, below)
        if problem is not None:
            self._note(depth, problem)
            return False
        if self.checks >= self.budget:
            raise _BudgetExhaustedError
        self.checks += 1
        if not _SIGNATURES.signed_by(cert, issuer):
            against = ": the chain does not verify against the root" if is_anchor else ""
            self._note(
                depth,
                f"the signature of {_name(cert)} does not verify with {_name(issuer)}{against}",
            )
            return False
        return True


def _ca_problem(issuer: x509.Certificate, below: int) -> str | None:
    """Why ``issuer`` may not issue a certificate with ``below`` CA certificates under it."""
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return f"{_name(issuer)} is not a CA (it has no basicConstraints)"
    if not constraints.ca:
        return f"{_name(issuer)} is not a CA"
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        return f"{_name(issuer)} is a CA whose keyUsage does not allow keyCertSign"
    if constraints.path_length is not None and below > constraints.path_length:
        return (
            f"{_name(issuer)} allows {constraints.path_length} CA certificates below it "
            f"(pathLenConstraint), the chain has {below}"
        )
    return None


class _SignatureCache:
    """Whether an issuer's key signed a certificate: a pure function of the two certificates,
    so remembered by their SHA-256 fingerprints (bounded; the certificates are not kept). A
    platform's PCK and PCK CA, a chip's VCEK and ASK, recur in every piece of evidence."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._known: OrderedDict[tuple[bytes, bytes], bool] = OrderedDict()
        self._lock = threading.Lock()

    def signed_by(self, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
        key = (cert.fingerprint(_SHA256), issuer.fingerprint(_SHA256))
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known.move_to_end(key)
                return known
        try:
            cert.verify_directly_issued_by(issuer)
            verified = True
        except (InvalidSignature, ValueError, TypeError):
            verified = False
        with self._lock:
            self._known[key] = verified
            while len(self._known) > self._size:
                self._known.popitem(last=False)
        return verified


_SIGNATURES = _SignatureCache()
