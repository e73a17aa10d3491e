"""Resource paths (``<repository>/<type>/<tag>``) and ``kbs://`` resource URIs.

A resource path has exactly three segments, each matching ``^[A-Za-z0-9_\\-][A-Za-z0-9_\\-.]*$``.
No segment may start with a dot, so ``.``, ``..`` and hidden names can never reach a
filesystem-backed store (path traversal), and a segment can never contain ``/`` or ``%``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from keybroker.errors import InvalidRequestPathError

SEGMENT_PATTERN = r"^[A-Za-z0-9_\-][A-Za-z0-9_\-.]*$"  # as messages and docs spell it
_SEGMENT = re.compile(SEGMENT_PATTERN[1:-1])
_MAX_SEGMENT_LENGTH = 255  # a longer name cannot be a file name on common filesystems


def is_valid_segment(segment: str, max_length: int = _MAX_SEGMENT_LENGTH) -> bool:
    """Whether ``segment`` may be one segment of a resource path (or a prefix of one)."""
    return len(segment) <= max_length and _SEGMENT.fullmatch(segment) is not None


@dataclass(frozen=True, slots=True)
class ResourcePath:
    """A validated ``repository/type/tag`` triple."""

    repository: str
    type: str
    tag: str

    @classmethod
    def from_segments(cls, segments: list[str] | tuple[str, ...]) -> ResourcePath:
        if len(segments) != 3:
            raise InvalidRequestPathError(
                f"a resource path has exactly 3 segments (repository/type/tag), "
                f"found {len(segments)}"
            )
        for segment in segments:
            if not is_valid_segment(segment):
                raise InvalidRequestPathError(
                    f"invalid resource path segment {segment[:64]!r}: each segment must match "
                    f"{SEGMENT_PATTERN}"
                )
        return cls(segments[0], segments[1], segments[2])

    @classmethod
    def parse(cls, text: str) -> ResourcePath:
        """Parse ``repo/type/tag`` (a leading ``/`` is tolerated, as operators often write it)."""
        return cls.from_segments(text.removeprefix("/").split("/"))

    @classmethod
    def from_uri(cls, uri: str) -> ResourcePath:
        """Parse ``kbs:///repo/type/tag`` or ``kbs://<host>/repo/type/tag``."""
        if not uri.startswith("kbs://"):
            raise InvalidRequestPathError(f"a resource URI starts with kbs://, found {uri[:64]!r}")
        rest = uri.removeprefix("kbs://")
        _, _, path = rest.partition("/")
        return cls.parse(path)

    def segments(self) -> list[str]:
        return [self.repository, self.type, self.tag]

    def __str__(self) -> str:
        return f"{self.repository}/{self.type}/{self.tag}"

    def uri(self) -> str:
        return f"kbs:///{self}"
