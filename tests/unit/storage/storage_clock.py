"""The shape of the shared ``clock`` fixture (``conftest.FakeClock``), for type annotations.

Importing ``conftest`` works under pytest and a whole-project mypy run, but not when mypy is
pointed at this directory alone; a structural type works in both.
"""

from __future__ import annotations

from typing import Protocol


class SteppedClock(Protocol):
    now: float

    def __call__(self) -> float: ...

    def advance(self, seconds: float) -> None: ...
