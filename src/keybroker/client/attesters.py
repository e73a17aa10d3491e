"""Attesters: produce evidence that binds a given report-data digest.

``SampleAttester`` is the software stand-in (``tee = "sample"``): its evidence proves nothing
about hardware and the default resource policy never releases to it.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod

from keybroker.protocol.models import JsonValue, Tee


class Attester(ABC):
    tee: Tee

    @abstractmethod
    def evidence(self, report_data: bytes) -> JsonValue:
        """Evidence binding ``report_data`` (the runtime-data digest)."""


class SampleAttester(Attester):
    tee = Tee.SAMPLE

    def __init__(self, svn: str = "1") -> None:
        self._svn = svn

    def evidence(self, report_data: bytes) -> JsonValue:
        return {"svn": self._svn, "report_data": base64.b64encode(report_data).decode()}


class SampleDeviceAttester(SampleAttester):
    """A stand-in attached device (``sampledevice``, class gpu); upstream reports svn "2"."""

    tee = Tee.SAMPLE_DEVICE

    def __init__(self, svn: str = "2") -> None:
        super().__init__(svn)
