"""The pure parts of the standing-water seed: netlink framing, the prefilter on a message's fixed
fields, the FIN correction, and a sock_diag message (built here byte for byte, as the kernel
lays it out) turned into a WaterSnapshot by pyroute2's decoder and ours."""

from __future__ import annotations

import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from otelwater.events.model import TCP_STATES
from otelwater.sockdiag import (
    FIN_IN,
    INET_DIAG_INFO,
    INET_DIAG_SKMEMINFO,
    SOCK_DIAG_BY_FAMILY,
    STATE_MASK,
    Prefilter,
    decode,
    iter_messages,
    next_gap_s,
    skmeminfo,
    snapshot_from_msg,
    unread_from_rqueue,
)
from otelwater.sockkey import sock_key

STATE = {v: k for k, v in TCP_STATES.items()}
NETNS = 4026531840


def rtattr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def diag_msg(*, family=socket.AF_INET, state="ESTABLISHED", src="127.0.0.1", sport=8080,
             dst="127.0.0.1", dport=40000, rqueue=0, inode=1234, mem=(0,) * 9,
             last_data_recv_ms=0, seq=1) -> bytes:
    """One SOCK_DIAG_BY_FAMILY reply: nlmsghdr, struct inet_diag_msg, SKMEMINFO and INFO."""
    def a16(addr):
        return socket.inet_pton(family, addr).ljust(16, b"\0")

    body = struct.pack("=BBBB", family, STATE[state], 0, 0) + struct.pack(">HH", sport, dport)
    body += a16(src) + a16(dst) + struct.pack("=IQIIIII", 0, 0, 0, rqueue, 0, 0, inode)
    info = bytearray(280)  # struct tcp_info; tcpi_last_data_recv is the u32 at offset 52
    struct.pack_into("=I", info, 52, last_data_recv_ms)
    body += rtattr(INET_DIAG_SKMEMINFO, struct.pack(f"={len(mem)}I", *mem))
    body += rtattr(INET_DIAG_INFO, bytes(info))
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 2, seq, 0) + body


def test_message_becomes_snapshot():
    # Given a socket holding 50,000 bytes, skmem r51664 rb131072 bl0 d3
    mem = (51664, 131072, 0, 87040, 1584, 0, 0, 0, 3)
    raw = diag_msg(rqueue=50_000, mem=mem, last_data_recv_ms=396)
    (mtype, seq, at, length), = iter_messages(raw)
    assert (mtype, seq, at, length) == (SOCK_DIAG_BY_FAMILY, 1, 0, len(raw))
    assert Prefilter().passes(raw, 0)
    msg = decode(raw, at, length)
    snap = snapshot_from_msg(msg, 123, NETNS, (77, "slowread"))
    assert snap.sock_key == sock_key(NETNS, "127.0.0.1", 8080, "127.0.0.1", 40000)
    assert (snap.laddr, snap.lport, snap.raddr, snap.rport) == ("127.0.0.1", 8080, "127.0.0.1",
                                                                40000)
    assert (snap.unread_bytes, snap.volume, snap.capacity, snap.drops) == (50_000, 51664,
                                                                          131072, 3)
    assert (snap.pid, snap.comm, snap.ino, snap.ts_ns) == (77, "slowread", 1234, 123)
    assert (snap.trigger, snap.tcp_state, snap.level) == ("standing", "ESTABLISHED", 0)
    assert msg.get_attr("INET_DIAG_INFO")["tcpi_last_data_recv"] == 396


def test_ipv6_and_fin():
    raw = diag_msg(family=socket.AF_INET6, state="CLOSE_WAIT", src="::1", dst="::1",
                   rqueue=50_001, mem=(1, 2, 0, 0, 0, 0, 0, 0, 0))
    snap = snapshot_from_msg(decode(raw, 0, len(raw)), 1, NETNS, None)
    assert snap.unread_bytes == 50_000       # the FIN's sequence number is not data
    assert snap.sock_key == sock_key(NETNS, "::1", 8080, "::1", 40000)
    assert (snap.pid, snap.comm, snap.tcp_state) == (0, "", "CLOSE_WAIT")


def test_fin_alone_is_no_water():
    raw = diag_msg(state="CLOSE_WAIT", rqueue=1)
    assert not Prefilter().passes(raw, 0)
    assert unread_from_rqueue(1, STATE["CLOSE_WAIT"]) == 0
    assert unread_from_rqueue(1, STATE["ESTABLISHED"]) == 1
    assert unread_from_rqueue(0, STATE["LAST_ACK"]) == 0
    assert {TCP_STATES[s] for s in FIN_IN} == {"CLOSE_WAIT", "LAST_ACK", "CLOSING"}


def test_dumped_states():
    dumped = {name for v, name in TCP_STATES.items() if STATE_MASK & (1 << v)}
    assert "LISTEN" not in dumped and "TIME_WAIT" not in dumped
    assert {"ESTABLISHED", "CLOSE_WAIT", "FIN_WAIT2"} <= dumped


def test_prefilter_ports_and_inodes():
    raw = diag_msg(rqueue=10, sport=8080, dport=40000, inode=55)
    assert Prefilter(ports=frozenset({8080})).passes(raw, 0)       # local port
    assert Prefilter(ports=frozenset({40000})).passes(raw, 0)      # remote port
    assert not Prefilter(ports=frozenset({9090})).passes(raw, 0)
    assert Prefilter(inodes=frozenset({55})).passes(raw, 0)
    assert not Prefilter(inodes=frozenset()).passes(raw, 0)        # pid filter, no sockets
    assert not Prefilter(ports=frozenset({8080}), inodes=frozenset({56})).passes(raw, 0)
    assert not Prefilter().passes(diag_msg(rqueue=0), 0)


@given(st.lists(st.tuples(st.integers(0, 60_000), st.integers(0, 2**32 - 1),
                          st.sampled_from(sorted(TCP_STATES.values()))), max_size=20))
def test_framing_and_prefilter_against_reference(socks):
    # Given several messages in one buffer (as one recv returns them), with padding
    buf = b"".join(diag_msg(rqueue=rq, inode=ino, state=state, seq=i)
                   for i, (rq, ino, state) in enumerate(socks))
    got = list(iter_messages(buf))
    assert [seq for _, seq, _, _ in got] == list(range(len(socks)))
    # Then the prefilter keeps exactly the sockets whose SIOCINQ is above zero
    kept = [seq for _, seq, at, _ in got if Prefilter().passes(buf, at)]
    assert kept == [i for i, (rq, _, state) in enumerate(socks)
                    if rq - (state in ("CLOSE_WAIT", "LAST_ACK", "CLOSING") and rq > 0) > 0]


def test_skmeminfo_from_pyroute2_hex():
    assert skmeminfo("d0:c9:00:00:00:00:02:00") == (51664, 131072)
    assert skmeminfo(struct.pack("=3I", 1, 2, 3)) == (1, 2, 3)


@given(st.integers(0, 10**10), st.floats(0.0, 10.0))
def test_gap_keeps_dumps_within_budget(cost_ns, floor_s):
    gap = next_gap_s(cost_ns, floor_s)
    assert gap >= floor_s
    assert cost_ns / 1e9 <= 0.10 * gap + 1e-12
