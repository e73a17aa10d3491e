"""Attribute py-spy's collapsed stacks (``--format raw``) to the parts of the release path.

A stack belongs to the first of the release path's own parts (PARTS) that one of its frames
names, frames taken from the outermost, so a part includes what it calls (the audit record's
JSON is the audit record's). Stacks in none of them belong to the first of the GENERIC parts any
of their frames names. Stacks of threads waiting rather than computing are counted apart
(``WAITING``). Used by ``kbsbench.profile``; pure, so the unit tests check it.
"""

from __future__ import annotations

import re
from collections import Counter

# (name, frame patterns); a frame is "function (path:line)" as py-spy writes it
PARTS: list[tuple[str, list[str]]] = [
    ("attest: evidence, verifier, attestation policy, EAR token", [r"Handshake\._?attest \("]),
    ("auth: nonce and session", [r"Handshake\._?auth \("]),
    ("audit record", [r"kbs/audit\.py", r"kbs/auditing\.py"]),
    ("token: verify or recall, TEE key parse", [r"kbs/tokens\.py"]),
    ("session store", [r"kbs/sessions\.py", r"storage/session"]),
    ("resource policy decision", [r"kbs/resource_policy\.py", r"keybroker/policy/"]),
    ("resource read (version record and bytes)", [r"plugins/resource", r"keybroker/storage/"]),
    ("seal: ECDH and AES-GCM (JWE)", [r"protocol/jwe\.py"]),
]
GENERIC: list[tuple[str, list[str]]] = [
    ("metrics (prometheus_client)", [r"prometheus_client", r"KbsMetrics\."]),
    ("handler: parse, dispatch, respond", [r"keybroker/kbs/", r"pydantic"]),
    ("HTTP server (uvicorn, httptools, starlette)", [r"uvicorn", r"httptools", r"starlette"]),
    ("event loop and other", [r""]),
]
_PARTS = [(name, [re.compile(p) for p in patterns]) for name, patterns in PARTS]
_GENERIC = [(name, [re.compile(p) for p in patterns]) for name, patterns in GENERIC]


# Threads waiting, not computing, that py-spy's --nonblocking sampling still reports: an idle
# executor thread waiting for work, and the audit log's fsync (the disk's time, not the CPU's).
WAITING = "waiting (idle executor thread, audit fsync)"
_WAITING = [
    re.compile(r"^_worker \(concurrent/futures/thread\.py"),
    re.compile(r"^FileSink\._write \("),
]


def attribute(collapsed: str) -> Counter[str]:
    """Samples per part, from py-spy's collapsed stacks (``frame;frame;... count``); stacks
    that are waiting count under ``WAITING``, outside every part."""
    parts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        waiting = any(p.search(frames[-1]) for p in _WAITING)
        parts[WAITING if waiting else _part(frames)] += int(count)
    return parts


def _part(frames: list[str]) -> str:
    for frame in frames:
        for name, patterns in _PARTS:
            if any(p.search(frame) for p in patterns):
                return name
    # the metrics middleware wraps every request: only what it calls itself is metrics
    inner = [f for f in frames if "Middleware.__call__" not in f]
    for name, patterns in _GENERIC:
        if any(p.search(frame) for frame in inner for p in patterns):
            return name
    return GENERIC[-1][0]
