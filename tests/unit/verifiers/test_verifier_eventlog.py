"""CC event logs: the recorded logs parse to upstream Trustee's ``uefi_event_logs`` exactly and
replay to upstream's RTMR values; every named malformation is refused with EvidenceError."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest

from conftest import vector
from keybroker.errors import EvidenceError
from keybroker.verifiers.intel.dcap import TdReportBody, parse_quote
from keybroker.verifiers.tcg.eventlog import (
    MAX_EVENT_DATA_SIZE,
    MAX_EVENTS,
    MAX_LOG_SIZE,
    Event,
    parse_event_log,
    replay_registers,
    replay_rtmrs,
    uefi_event_logs,
    verify_against_rtmrs,
)
from keybroker.verifiers.tcg.eventlog_details import event_details
from keybroker.verifiers.tcg.eventlog_devpath import render_device_path, render_node

WITH_EXPECTED_OUTPUT = [
    "CCEL_AAEL_alibabacloud",
    "CCEL_data",
    "CCEL_data_csv",
    "CCEL_data_grub",
    "CCEL_data_grub_gke",
    "CCEL_data_ovmf",
]
ZERO = "00" * 48
# RTMR0-3 that upstream's own tests assert for these logs (deps/eventlog, test_rtmr_integrity)
UPSTREAM_RTMRS = {
    "CCEL_data": (
        "2dc712306a963eadb894ad47dbaa17df44814151555aee11cbb843becca88950ffd079664902e6f22c66f7c8213543f4",
        "0fa3be56af61208bbd179dc7b124988eb929319154663c539d6f46445ecac2fec287075047ff7bd1922829fec28cd3cf",
        ZERO,
        ZERO,
    ),
    "CCEL_data_ovmf": (
        "8566f998798db09443b244c62de9a3041fb02e2e6936c4396d784bba2e90177329ec5aba3bb484404f2ab9cc90abe193",
        "775b9f6bfe99f8a31396f0d0218e67ffa796d3b96ccf961cbb0deba48c79c00f082cda1a5567c1c16305f1fc210c13c6",
        "94eaf7a7bf398ed8d888c91057ae0261802e4f3df084213a76ca7f0b5055ac9d2241de43cd58d9e8b49c503bbf25f34a",
        ZERO,
    ),
    "CCEL_data_grub": (
        "cec0a104f691f60da2387fea3c2de00c4ac035e2bb479ff02edcce69039d9e9907f0b3e55031da3dc7038f423adebd79",
        "6c289e0c62182d41ebe97bdbc9872d10998a08eaa86adcdc684001a363207ee72942c7522cdf00a4bbc3d784bed7b670",
        "08919d017ba0e52cd6d966351c7de16fe76c1d3d3d3da4554239e4c7d16cb8b82a94e7eaea3a0e6e18eb690b999fd31e",
        ZERO,
    ),
    "CCEL_data_gcp": (
        "3300980705adf09d28b707b79699d9874892164280832be2c386a715b6e204e0897fb564a064f810659207ba862b304f",
        "204d49f78d29918fe7b2f694e76653861a0c2a018987d2c3a54266eff737232524cf0af68c4d180e2f8c2c0937f21967",
        ZERO,
        ZERO,
    ),
    "CCEL_data_grub_gke": (
        "bc9945139042cf2cc75caf920aa57f14884ecfd7e893bccc51250c8ce90eb53ce72741e6adaa18183eb1331a87d4544a",
        "c17cb288a4dee302bb9ed8d27257a168f3264ad68cab53757f37eeaa7039657fa887cad65cf910e0fdc435ff110f8a7b",
        "334aeba2c985f8886cea97d1ecffbd512769d528b9a94009583db667ad7d2faa7d37fa145d75b192ceee2d2f10b2eb6d",
        ZERO,
    ),
}

SHA384, SHA256, SM3 = 0x000C, 0x000B, 0x0012
EV_SEPARATOR, EV_EVENT_TAG, EV_IPL = 0x4, 0x6, 0xD
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
END = b"\xff" * 8


def _eventlog(name: str) -> bytes:
    return vector("eventlog", name).read_bytes()


def _expected(path: Path) -> object:
    return json.loads(path.read_text())["uefi_event_logs"]


def _extend(register: bytes, digest: bytes) -> bytes:
    return hashlib.sha384(register + digest).digest()


# --- a synthetic log, built the way firmware writes one --------------------------------------


def _spec_id(algorithms: list[tuple[int, int]] | None = None, vendor: bytes = b"") -> bytes:
    algorithms = [(SHA384, 48)] if algorithms is None else algorithms
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBB", 0, 0, 2, 0, 2)
    body += struct.pack("<I", len(algorithms))
    body += b"".join(struct.pack("<HH", alg, size) for alg, size in algorithms)
    body += bytes([len(vendor)]) + vendor
    return struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + body


def _record(
    index: int,
    event_type: int,
    data: bytes,
    digests: list[tuple[int, bytes]] | None = None,
    data_size: int | None = None,
) -> bytes:
    digests = [(SHA384, hashlib.sha384(data).digest())] if digests is None else digests
    out = struct.pack("<III", index, event_type, len(digests))
    out += b"".join(struct.pack("<H", alg) + digest for alg, digest in digests)
    return out + struct.pack("<I", len(data) if data_size is None else data_size) + data


def _log(*records: bytes, spec: bytes | None = None) -> bytes:
    return (_spec_id() if spec is None else spec) + b"".join(records) + END


def _image_load(path: bytes) -> bytes:
    return struct.pack("<QQQQ", 0x1000, 0x2000, 0, len(path)) + path


def _node(node_type: int, sub_type: int, data: bytes) -> bytes:
    return struct.pack("<BBH", node_type, sub_type, 4 + len(data)) + data


END_NODE = _node(0x7F, 0xFF, b"")


# --- upstream's claims ----------------------------------------------------------------------


@pytest.mark.parametrize("name", WITH_EXPECTED_OUTPUT)
def test_uefi_event_logs_equal_upstream(name: str) -> None:
    log = parse_event_log(_eventlog(name))
    expected = _expected(vector("eventlog", f"{name}_out.json"))
    assert uefi_event_logs(log.events) == expected


def test_tdx_claims_fixture_event_log_equals_upstream() -> None:
    log = parse_event_log(vector("verifier", "CCEL_data").read_bytes())
    expected = _expected(vector("verifier", "parse_tdx_claims_expected.json"))
    assert uefi_event_logs(log.events) == expected


def test_declared_algorithms_are_reported() -> None:
    assert parse_event_log(_eventlog("CCEL_data_ovmf")).algorithms == ("SHA-384",)
    assert parse_event_log(_eventlog("CCEL_data_csv")).algorithms == ("SM3",)


def test_index_is_the_logged_register_index_not_the_rtmr_number() -> None:
    """Upstream reports the CC measurement register index: 0 MRTD, 1-4 RTMR0-3."""
    events = parse_event_log(_eventlog("CCEL_data_grub_gke")).events
    assert {event.mr_index for event in events} == {0, 1, 2, 3}
    assert [e.type_name for e in events if e.mr_index == 0] == ["EV_NO_ACTION"] * 2


def test_aael_events_decode_domain_operation_and_content() -> None:
    events = parse_event_log(_eventlog("CCEL_AAEL_alibabacloud")).events
    aael = [event for event in events if event.details.unicode_name == "AAEL"]
    assert [event.mr_index for event in aael] == [4, 4]
    assert aael[0].details.data is not None and aael[0].details.data.content == "some-content"
    assert aael[1].details.data is not None
    assert aael[1].details.data.content == {"key": "value", "nested-key": {"sub-key": "value"}}


def test_aael_content_that_is_not_json_stays_text() -> None:
    tagged = b"domain op {not json"
    details = event_details(EV_EVENT_TAG, struct.pack("<II", 0x4141454C, len(tagged)) + tagged)
    assert details.to_json() == {
        "string": "domain op {not json",
        "unicode_name": "AAEL",
        "data": {"domain": "domain", "operation": "op", "content": "{not json"},
    }


def test_aael_content_nan_is_text_as_serde_json_reads_it() -> None:
    tagged = b"d op NaN"
    details = event_details(EV_EVENT_TAG, struct.pack("<II", 0x4141454C, len(tagged)) + tagged)
    assert details.data is not None and details.data.content == "NaN"


def test_aael_event_without_operation_is_refused() -> None:
    tagged = b"domain-only"
    event = _record(4, EV_EVENT_TAG, struct.pack("<II", 0x4141454C, len(tagged)) + tagged)
    with pytest.raises(EvidenceError, match="AAEL event needs a domain, an operation"):
        parse_event_log(_log(event))


def test_ipl_utf16_strings_as_google_shim_logs_them() -> None:
    data = b".\x00" + "linux".encode("utf-16-le") + b"\x00\x00"
    assert event_details(EV_IPL, data).string == "linux"


def test_ipl_binary_data_is_shown_as_hex() -> None:
    assert event_details(EV_IPL, b"\xff\xfe\x00").string == "fffe00"


def test_device_path_renderings() -> None:
    ipv4 = bytes([10, 0, 0, 2, 192, 168, 1, 1]) + struct.pack("<HHHB", 0, 0, 6, 1) + bytes(8)
    mac = bytes.fromhex("525400123456") + bytes(26) + b"\x01"
    bbs = struct.pack("<HH", 0x02, 7) + b"disk\x00"
    mbr = struct.pack("<IQQ", 1, 63, 2048) + struct.pack("<I", 0xCAFE) + bytes(12) + b"\x01\x01"
    assert render_node(3, 0x0C, ipv4) == "IPv4(1.1.168.192,TCP,Static,2.0.0.10)"  # as upstream
    assert render_node(3, 0x0B, mac) == "Mac(525400123456,0x01)"
    assert render_node(5, 0x01, bbs) == "BBS(HARD_DRIVE,disk,7)"
    assert render_node(4, 0x01, mbr) == "HD(1,MBR,0x0000cafe,0x3f,0x800)"
    assert render_node(3, 0x05, b"\x01\x02") == "USB(1,2)"
    assert render_node(9, 9, b"\xab") == "Path(9,9,ab)"
    assert render_node(1, 0x01, b"\x01") == "Path(1,1,01)"  # too short for PCI: generic


def test_boot_services_application_device_paths() -> None:
    path = _node(1, 1, b"\x00\x02") + _node(4, 4, "\\a.efi\x00".encode("utf-16-le"))
    event = _record(2, EV_EFI_BOOT_SERVICES_APPLICATION, _image_load(path + END_NODE))
    (parsed,) = parse_event_log(_log(event)).events
    assert parsed.details.device_paths == ("Pci(0,2)", "File(\\a.efi)")
    assert parsed.to_json()["details"] == {"device_paths": ["Pci(0,2)", "File(\\a.efi)"]}


def test_gcp_log_without_expected_output_parses() -> None:
    events = parse_event_log(_eventlog("CCEL_data_gcp")).events
    assert len(events) == 21
    assert all(event.digest("SHA-384") is not None for event in events)


# --- replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UPSTREAM_RTMRS))
def test_replay_equals_upstream_rtmrs(name: str) -> None:
    events = parse_event_log(_eventlog(name)).events
    expected = tuple(bytes.fromhex(value) for value in UPSTREAM_RTMRS[name])
    assert tuple(replay_rtmrs(events)) == expected
    verify_against_rtmrs(events, (expected[0], expected[1], expected[2], expected[3]))


def test_aael_events_extend_rtmr3() -> None:
    events = parse_event_log(_eventlog("CCEL_AAEL_alibabacloud")).events
    rtmr3 = bytes(48)
    for event in events:
        if event.mr_index == 4:
            assert event.digest_matches_event
            rtmr3 = _extend(rtmr3, hashlib.sha384(event.data).digest())
    assert replay_rtmrs(events)[3] == rtmr3 != bytes(48)


def test_csv_log_replays_its_sm3_registers() -> None:
    events = parse_event_log(_eventlog("CCEL_data_csv")).events
    registers = replay_registers(events, "SM3", 4)
    assert [len(register) for register in registers] == [32] * 4
    assert registers[3] == bytes(32) and registers[0] != bytes(32)


def test_quote_4_rtmrs_do_not_match_the_ccel_data_log() -> None:
    """Upstream's claims fixture pairs this log with tdx_quote_4, but the quote's RTMR0/1 are
    not the log's replay (upstream builds the claims without the replay check)."""
    quote = parse_quote(vector("verifier", "tdx_quote_4.dat").read_bytes())
    assert isinstance(quote.body, TdReportBody)
    claims = json.loads(vector("verifier", "parse_tdx_claims_expected.json").read_text())
    assert [rtmr.hex() for rtmr in quote.body.rtmrs] == [
        claims["quote"]["body"][f"rtmr_{i}"] for i in range(4)
    ]
    events = parse_event_log(vector("verifier", "CCEL_data").read_bytes()).events
    replayed = replay_rtmrs(events)
    assert replayed[0] != quote.body.rtmrs[0] and replayed[1] != quote.body.rtmrs[1]
    assert replayed[2:] == list(quote.body.rtmrs[2:])
    with pytest.raises(EvidenceError, match=r"does not replay to RTMR0 \(event log index 1\)"):
        verify_against_rtmrs(events, quote.body.rtmrs)


def test_tampered_event_digest_fails_replay_naming_its_register() -> None:
    events = parse_event_log(_eventlog("CCEL_data_ovmf")).events
    rtmrs = replay_rtmrs(events)
    forged = rtmrs[2][:-1] + bytes([rtmrs[2][-1] ^ 1])
    with pytest.raises(EvidenceError, match="does not replay to RTMR2"):
        verify_against_rtmrs(events, (rtmrs[0], rtmrs[1], forged, rtmrs[3]))


def test_event_dropped_from_log_fails_replay() -> None:
    events = parse_event_log(_eventlog("CCEL_data_ovmf")).events
    rtmrs = replay_rtmrs(events)
    last_rtmr1 = max(i for i, event in enumerate(events) if event.mr_index == 2)
    shortened = events[:last_rtmr1] + events[last_rtmr1 + 1 :]
    with pytest.raises(EvidenceError, match="does not replay to RTMR1"):
        verify_against_rtmrs(shortened, (rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]))


def test_event_without_sha384_digest_is_refused_by_replay() -> None:
    """Upstream silently skips such an event, leaving it in the claims but bound to nothing."""
    events = parse_event_log(_eventlog("CCEL_data_csv")).events
    with pytest.raises(EvidenceError, match="has no SHA-384 digest to replay"):
        replay_rtmrs(events)


def test_event_beyond_rtmr3_is_refused_by_replay() -> None:
    events = parse_event_log(_log(_record(5, EV_SEPARATOR, b"\x00" * 4))).events
    with pytest.raises(EvidenceError, match="only indexes 0 to 4 are measurement registers"):
        replay_rtmrs(events)


def test_mrtd_events_are_not_replayed() -> None:
    events = parse_event_log(_log(_record(0, EV_SEPARATOR, b"\x00" * 4))).events
    assert replay_rtmrs(events) == [bytes(48)] * 4


def test_wrong_rtmr_shape_is_refused() -> None:
    with pytest.raises(EvidenceError, match="expected 4 RTMRs of 48 bytes"):
        verify_against_rtmrs([], (bytes(48), bytes(48), bytes(48), bytes(32)))


# --- structure ------------------------------------------------------------------------------


def test_log_without_padding_ends_at_its_last_record() -> None:
    log = _spec_id() + _record(1, EV_SEPARATOR, bytes(4))
    assert len(parse_event_log(log).events) == 1


def test_zero_padding_ends_the_log() -> None:
    log = _spec_id() + _record(1, EV_SEPARATOR, bytes(4)) + bytes(64)
    assert len(parse_event_log(log).events) == 1


def test_records_after_the_end_marker_are_ignored_as_upstream() -> None:
    log = _log(_record(1, EV_SEPARATOR, bytes(4))) + _record(2, EV_SEPARATOR, bytes(4))
    assert [event.mr_index for event in parse_event_log(log).events] == [1]


def test_spec_id_signature_is_not_required_as_attestation_agent_zeroes_it() -> None:
    """Hygon CSV evidence carries a log whose spec-ID event has an all-zero signature."""
    evidence = json.loads(vector("verifier", "csv_evidence.json").read_text())
    log = parse_event_log(base64.b64decode(evidence["cc_eventlog"]))
    assert log.algorithms == ("SHA-384", "SM3") and log.events == ()


def test_events_are_frozen() -> None:
    (event,) = parse_event_log(_log(_record(1, EV_SEPARATOR, bytes(4)))).events
    assert isinstance(event, Event)
    with pytest.raises(AttributeError):
        event.mr_index = 2  # type: ignore[misc]


# --- named malformations --------------------------------------------------------------------


def test_empty_log_is_refused() -> None:
    with pytest.raises(EvidenceError, match="truncated"):
        parse_event_log(b"")


def test_truncated_record_is_refused() -> None:
    log = _spec_id() + _record(1, EV_SEPARATOR, bytes(4))
    with pytest.raises(EvidenceError, match=r"the event log is truncated: event 0 .* data"):
        parse_event_log(log[:-2])


def test_truncated_digest_is_refused() -> None:
    log = _spec_id() + _record(1, EV_SEPARATOR, bytes(4))[:30]
    with pytest.raises(EvidenceError, match=r"truncated: .*SHA-384 digest"):
        parse_event_log(log)


def test_partial_record_header_after_last_event_is_refused() -> None:
    log = _spec_id() + _record(1, EV_SEPARATOR, bytes(4)) + b"\x01\x00\x00"
    with pytest.raises(EvidenceError, match="truncated: an event header needs 8 bytes"):
        parse_event_log(log)


def test_log_over_16_mib_is_refused() -> None:
    with pytest.raises(EvidenceError, match="at most 16777216 are accepted"):
        parse_event_log(_log() + b"\xff" * MAX_LOG_SIZE)


def test_event_data_over_1_mib_is_refused() -> None:
    big = bytes(MAX_EVENT_DATA_SIZE + 1)
    with pytest.raises(EvidenceError, match="at most 1048576 are accepted per event"):
        parse_event_log(_log(_record(1, EV_SEPARATOR, big)))


def test_absurd_event_data_size_is_refused() -> None:
    record = _record(1, EV_SEPARATOR, bytes(4), data_size=0xFFFFFFFF)
    with pytest.raises(EvidenceError, match="4294967295 bytes; at most 1048576"):
        parse_event_log(_log(record))


def test_absurd_spec_id_event_size_is_refused() -> None:
    spec = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", 0xFFFFFFF0)
    with pytest.raises(EvidenceError, match="spec-ID event data is 4294967280 bytes"):
        parse_event_log(spec)


def test_digest_count_over_8_is_refused() -> None:
    record = _record(1, EV_SEPARATOR, bytes(4), [(SHA384, bytes(48))] * 9)
    with pytest.raises(EvidenceError, match="has 9 digests; at most 8"):
        parse_event_log(_log(record))


def test_absurd_digest_count_is_refused() -> None:
    record = struct.pack("<III", 1, EV_SEPARATOR, 0xFFFFFFFF)
    with pytest.raises(EvidenceError, match="has 4294967295 digests"):
        parse_event_log(_log(record))


def test_unknown_algorithm_id_in_event_is_refused() -> None:
    record = _record(1, EV_SEPARATOR, bytes(4), [(0x0099, bytes(48))])
    with pytest.raises(EvidenceError, match="algorithm 0x0099, which the spec-ID event does not"):
        parse_event_log(_log(record))


def test_algorithm_not_declared_by_spec_id_is_refused() -> None:
    record = _record(1, EV_SEPARATOR, bytes(4), [(SHA256, hashlib.sha256(bytes(4)).digest())])
    with pytest.raises(EvidenceError, match="algorithm 0x000b, which the spec-ID event does not"):
        parse_event_log(_log(record))


def test_unknown_algorithm_in_spec_id_is_refused() -> None:
    with pytest.raises(EvidenceError, match="declares unknown algorithm id 0x0099"):
        parse_event_log(_log(spec=_spec_id([(SHA384, 48), (0x0099, 16)])))


def test_spec_id_digest_size_that_is_not_the_algorithms_is_refused() -> None:
    """A SHA-384 'digest' of 8 bytes would let a short value stand in for a register extend."""
    with pytest.raises(EvidenceError, match="declares SHA-384 digests of 8 bytes; SHA-384 has 48"):
        parse_event_log(_log(spec=_spec_id([(SHA384, 8)])))


def test_spec_id_declaring_an_algorithm_twice_is_refused() -> None:
    with pytest.raises(EvidenceError, match="declares SHA-384 twice"):
        parse_event_log(_log(spec=_spec_id([(SHA384, 48), (SHA384, 48)])))


def test_spec_id_declaring_no_algorithm_is_refused() -> None:
    with pytest.raises(EvidenceError, match="declares 0 algorithms; expected 1 to 8"):
        parse_event_log(_log(spec=_spec_id([])))


def test_spec_id_with_bytes_after_vendor_info_is_refused() -> None:
    spec = _spec_id()
    body_size = struct.unpack_from("<I", spec, 28)[0]
    padded = spec[:28] + struct.pack("<I", body_size + 3) + spec[32:] + b"abc"
    with pytest.raises(EvidenceError, match="3 bytes after its vendor info"):
        parse_event_log(padded + END)


def test_log_not_starting_with_spec_id_is_refused() -> None:
    with pytest.raises(EvidenceError, match="must start with a spec-ID event"):
        parse_event_log(_record(1, EV_SEPARATOR, bytes(4)) + END)


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(EvidenceError, match="unknown event type 0x7777"):
        parse_event_log(_log(_record(1, 0x7777, bytes(4))))


def test_two_digests_of_one_algorithm_are_refused() -> None:
    """Replay would extend one while a policy reads the other."""
    record = _record(1, EV_SEPARATOR, bytes(4), [(SHA384, bytes(48)), (SHA384, bytes(48))])
    with pytest.raises(EvidenceError, match="has two SHA-384 digests"):
        parse_event_log(_log(record))


def test_sha1_event_digest_is_refused_as_upstream() -> None:
    spec = _spec_id([(0x0004, 20), (SHA384, 48)])
    record = _record(1, EV_SEPARATOR, bytes(4), [(0x0004, bytes(20))])
    with pytest.raises(EvidenceError, match="SHA-1 event digests are not supported"):
        parse_event_log(_log(record, spec=spec))


def test_too_many_events_are_refused() -> None:
    record = _record(1, EV_SEPARATOR, b"", digests=[])
    with pytest.raises(EvidenceError, match=f"more than {MAX_EVENTS} events"):
        parse_event_log(_log(*[record] * (MAX_EVENTS + 1)))


def test_zero_length_device_path_node_is_refused_not_looped_on() -> None:
    looping = struct.pack("<BBH", 1, 1, 0) + bytes(4)
    record = _record(2, EV_EFI_BOOT_SERVICES_APPLICATION, _image_load(looping + END_NODE))
    with pytest.raises(EvidenceError, match="device path node claims 0 bytes"):
        parse_event_log(_log(record))


def test_device_path_node_running_past_the_path_is_refused() -> None:
    with pytest.raises(EvidenceError, match="node claims 200 bytes; expected 4 to 6"):
        render_device_path(struct.pack("<BBH", 1, 1, 200) + b"\x00\x01")


def test_device_path_longer_than_the_event_is_refused() -> None:
    data = struct.pack("<QQQQ", 0, 0, 0, 0xFFFFFFFFFFFFFFFF) + END_NODE
    record = _record(2, EV_EFI_BOOT_SERVICES_APPLICATION, data)
    with pytest.raises(EvidenceError, match="device path of 18446744073709551615 bytes"):
        parse_event_log(_log(record))


def test_efi_variable_name_longer_than_the_event_is_refused() -> None:
    data = bytes(16) + struct.pack("<QQ", 2**62, 0) + b"A\x00"
    record = _record(1, 0x80000001, data)
    with pytest.raises(EvidenceError, match=r"EV_EFI_VARIABLE_DRIVER_CONFIG\): an EFI variable"):
        parse_event_log(_log(record))


def test_efi_variable_data_longer_than_the_event_is_refused() -> None:
    data = bytes(16) + struct.pack("<QQ", 1, 100) + b"A\x00" + b"short"
    with pytest.raises(EvidenceError, match="EFI variable data of 100 bytes runs past"):
        parse_event_log(_log(_record(1, 0x80000002, data)))


def test_tagged_event_size_past_its_data_is_refused() -> None:
    data = struct.pack("<II", 1, 1000) + b"abc"
    with pytest.raises(EvidenceError, match="tagged data of 1000 bytes runs past"):
        parse_event_log(_log(_record(3, EV_EVENT_TAG, data)))


def test_action_event_that_is_not_utf8_is_refused_as_upstream() -> None:
    with pytest.raises(EvidenceError, match=r"EV_EFI_ACTION\): the event text is not valid UTF-8"):
        parse_event_log(_log(_record(2, 0x80000007, b"\xff\xfe")))


def test_counted_description_longer_than_its_event_is_refused() -> None:
    with pytest.raises(EvidenceError, match="counted description of 55 bytes does not fit 3"):
        parse_event_log(_log(_record(1, 0x8000000B, b"\x37ab")))
