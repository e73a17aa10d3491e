"""Evidence verifiers, one module per TEE. Pure: no sockets, collateral is injected.

Registration is this explicit table; a TEE without an entry is refused with a clear error.
"""

from __future__ import annotations

from keybroker.protocol.models import Tee
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.sample import SampleVerifier
from keybroker.verifiers.sample_device import SampleDeviceVerifier

VERIFIERS: dict[Tee, type[Verifier]] = {
    Tee.SAMPLE: SampleVerifier,
    Tee.SAMPLE_DEVICE: SampleDeviceVerifier,
}

__all__ = ["VERIFIERS", "TeeClaims", "Verifier"]
