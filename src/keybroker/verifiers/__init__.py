"""Evidence verifiers, grouped by vendor (``intel/``, ``amd/``, ``azure/``, ...; formats shared by
several TEEs in ``tcg/`` and ``tpm/``). Pure: no sockets, collateral is injected.

Registration is this explicit table; a TEE without an entry is refused with a clear error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from keybroker.protocol.models import Tee
from keybroker.verifiers.amd.snp import SnpVerifier
from keybroker.verifiers.amd.snp_settings import build_snp_appraiser
from keybroker.verifiers.arm.cca import build_cca_verifier
from keybroker.verifiers.azure.az_snp_vtpm import AzSnpVtpmVerifier
from keybroker.verifiers.azure.az_tdx_vtpm import AzTdxVtpmVerifier
from keybroker.verifiers.base import TeeClaims, Verifier
from keybroker.verifiers.hygon.csv import CsvVerifier
from keybroker.verifiers.hygon.dcu import HygonDcuVerifier
from keybroker.verifiers.hygon.settings import build_hygon_fetcher
from keybroker.verifiers.ibm.se import SeVerifier
from keybroker.verifiers.ibm.se_settings import se_settings
from keybroker.verifiers.intel.dcap_settings import (
    CollateralAppraiser,
    build_fetcher,
    dcap_settings,
)
from keybroker.verifiers.intel.verifier import SgxVerifier, TdxVerifier
from keybroker.verifiers.nvidia.dpu import build_dpu_verifier
from keybroker.verifiers.nvidia.gpu import build_nvidia_verifier
from keybroker.verifiers.sample import SampleVerifier
from keybroker.verifiers.sample_device import SampleDeviceVerifier
from keybroker.verifiers.tpm.trusted_aks import build_trusted_aks
from keybroker.verifiers.tpm.verifier import TpmVerifier


def build_verifiers(
    verifier_config: dict[str, Any] | None = None, *, clock: Callable[[], float] = time.time
) -> dict[Tee, Verifier]:
    """One verifier per supported TEE, built from ``[attestation_service.verifier_config]``.
    Nothing here touches the network: collateral is fetched when a quote is verified."""
    appraiser = CollateralAppraiser(build_fetcher(dcap_settings(verifier_config), clock))
    snp_appraiser = build_snp_appraiser(verifier_config, clock)
    hygon_fetcher = build_hygon_fetcher(verifier_config)
    return {
        Tee.SAMPLE: SampleVerifier(),
        Tee.SAMPLE_DEVICE: SampleDeviceVerifier(),
        Tee.TDX: TdxVerifier(appraiser, clock=clock),
        Tee.SGX: SgxVerifier(appraiser, clock=clock),
        Tee.SNP: SnpVerifier(snp_appraiser, clock=clock),
        Tee.AZ_SNP_VTPM: AzSnpVtpmVerifier(snp_appraiser, clock=clock),
        Tee.AZ_TDX_VTPM: AzTdxVtpmVerifier(appraiser, clock=clock),
        Tee.TPM: TpmVerifier(build_trusted_aks(verifier_config)),
        Tee.CSV: CsvVerifier(hygon_fetcher),
        Tee.HYGON_DCU: HygonDcuVerifier(hygon_fetcher),
        Tee.NVIDIA: build_nvidia_verifier(verifier_config, clock),
        Tee.NVIDIA_DPU: build_dpu_verifier(verifier_config, clock),
        Tee.CCA: build_cca_verifier(verifier_config, clock=clock),
        Tee.SE: SeVerifier(se_settings(verifier_config), clock=clock),
    }


__all__ = ["TeeClaims", "Verifier", "build_verifiers"]
