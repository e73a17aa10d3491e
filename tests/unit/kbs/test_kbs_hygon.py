"""Hygon TEEs on a default KBS: ``/auth`` accepts ``csv`` and ``hygondcu``, and a CSV guest whose
chain ends at a test root, not the pinned Hygon HRK, is refused at ``/attest``."""

from __future__ import annotations

import pytest

from conftest import Kbs
from keybroker.client.attesters import Attester
from keybroker.client.rcar import KbsClient
from keybroker.errors import KbsRejectedError
from keybroker.protocol.models import JsonValue, Tee
from standins.hygon_pki import HygonPki


class ForeignRootCsvAttester(Attester):
    """A CSV guest whose whole chain (HRK included) is a test PKI's."""

    tee = Tee.CSV

    def __init__(self, pki: HygonPki) -> None:
        self._pki = pki

    def evidence(self, report_data: bytes) -> JsonValue:
        report = self._pki.csv_report_v1(report_data, measure=bytes(32))
        return self._pki.csv_evidence(report, with_hsk_cek=True)


@pytest.mark.parametrize("tee", ["csv", "hygondcu"])
def test_auth_with_a_hygon_tee_answers_200_on_a_default_kbs(kbs: Kbs, tee: str) -> None:
    body = {"version": "0.4.0", "tee": tee, "extra-params": {}}
    reply = kbs.client.post("/kbs/v0/auth", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.headers["set-cookie"].startswith("kbs-session-id=")


def test_csv_guest_chained_to_an_unpinned_root_is_refused_at_attest(kbs: Kbs) -> None:
    guest = KbsClient(
        "http://testserver", http=kbs.client, attester=ForeignRootCsvAttester(HygonPki())
    )
    with pytest.raises(
        KbsRejectedError, match=r"KBS answered 401: the HSK names signer .*, not the HRK's key id"
    ):
        guest.attest()
