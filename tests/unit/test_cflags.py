"""How the loader specialises bpf/water.c (pure: no root, no BCC)."""

import pytest

from otelwater.errors import ProbeLoadError, UsageError
from otelwater.probes.kernel import WaterOptions, build_cflags

OFFSETS = {"OFF_SK_RCVQ_QLEN": 184, "OFF_SK_RMEM_ALLOC": 192, "OFF_SK_BACKLOG_LEN": 196,
           "OFF_SK_RCVBUF": 244, "OFF_SK_DROPS": 136, "OFF_SKC_NUM": 14,
           "OFF_TCP_COPIED_SEQ": 1464, "OFF_TCP_RCV_NXT": 1664}   # Linux 6.18's


def flags(**kw):
    return dict(f[2:].split("=", 1) for f in build_cflags(OFFSETS, WaterOptions(**kw), True)
                if f.startswith("-D"))


def test_offsets_and_span():
    d = flags()
    assert d["OFF_SK_RCVBUF"] == "244"
    assert d["OTW_SPAN_START"] == "136" and d["OTW_SPAN_LEN"] == str(248 - 136)
    assert d["OTW_FILTER_PORTS"] == d["OTW_FILTER_PIDS"] == d["OTW_FILTER_CGROUPS"] == "0"


def test_sequence_numbers_in_one_read_when_near():
    d = flags()
    assert d["OTW_SEQ_START"] == "1464" and d["OTW_SEQ_LEN"] == str(1668 - 1464)
    # rcv_nxt before copied_seq works the same; too far apart: two reads (length 0)
    d = dict(f[2:].split("=", 1) for f in build_cflags(
        dict(OFFSETS, OFF_TCP_RCV_NXT=1400), WaterOptions(), True) if f.startswith("-D"))
    assert d["OTW_SEQ_START"] == "1400" and d["OTW_SEQ_LEN"] == str(1468 - 1400)
    d = dict(f[2:].split("=", 1) for f in build_cflags(
        dict(OFFSETS, OFF_TCP_RCV_NXT=2000), WaterOptions(), True) if f.startswith("-D"))
    assert d["OTW_SEQ_LEN"] == "0"


def test_filters_compile_in_only_when_asked():
    d = flags(ports=frozenset({80}), pids=frozenset({1}), follow=True)
    assert (d["OTW_FILTER_PORTS"], d["OTW_FILTER_PIDS"], d["OTW_FOLLOW"]) == ("1", "1", "1")


def test_ring_buffer_pages_must_be_a_power_of_two():
    with pytest.raises(UsageError, match="power of two"):
        flags(ringbuf_pages=3)
    assert flags(ringbuf_pages=1)["OTW_RINGBUF_PAGES"] == "1"


def test_fields_too_far_apart_are_refused():
    far = dict(OFFSETS, OFF_SK_RCVBUF=900)
    with pytest.raises(ProbeLoadError, match="bytes apart"):
        build_cflags(far, WaterOptions(), True)
