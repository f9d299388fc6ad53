"""Standing water is reported when it changes, and once a heartbeat while it does not: a
StandingWater whose sock_diag dump is a fixture (messages built byte for byte as the kernel
lays them out, tests/unit/test_sockdiag.py), no root, no netlink."""

from __future__ import annotations

import socket

import pytest

from otelwater.sockdiag import HEARTBEAT_S, StandingWater, water_of
from tests.unit.test_sockdiag import diag_msg

S = 10**9
MEM = (51664, 131072, 0, 87040, 1584, 0, 0, 0, 0)   # skmem r51664 rb131072 ... d0


class Host:
    """The kernel's socket table, as a test sets it: (sport, dport) -> diag_msg arguments."""

    def __init__(self):
        self.socks: dict[tuple[int, int], dict] = {}
        self.dumps = 0

    def add(self, sport, dport=40000, **kw):
        kw.setdefault("rqueue", 50_000)
        kw.setdefault("mem", MEM)
        self.socks[(sport, dport)] = dict(sport=sport, dport=dport, inode=sport, **kw)

    def dump(self, family):
        if family != socket.AF_INET:
            return
        self.dumps += 1
        for seq, kw in enumerate(self.socks.values(), 1):
            raw = diag_msg(seq=seq, **kw)
            yield memoryview(raw), 0, len(raw)


def standing(host, **kw) -> StandingWater:
    sw = StandingWater(**kw)
    sw._dump = host.dump
    sw._owner = lambda ino, held: (1000 + ino, "svc")
    sw._seq = 1
    return sw


def keys(snaps):
    return sorted(s.lport for s in snaps)


def test_steady_sockets_are_reported_once_then_once_a_heartbeat():
    # Given 200 sockets holding water that nothing moves
    host = Host()
    for port in range(10_000, 10_200):
        host.add(port)
    sw = standing(host)
    t0 = 5 * S
    first = sw.scan(t0)
    assert len(first) == 200 and {s.trigger for s in first} == {"standing"}
    quiet = sw.keys
    # When the probe sweeps every second for 130 s and sees no event on them
    lines = {}
    for i in range(1, 131):
        for s in sw.sweep(t0 + i * S, quiet):
            assert s.ts_ns == t0 + i * S
            lines.setdefault(i, []).append(s.lport)
    # Then each is reported again only at the heartbeat (60 s), not at every sweep
    assert HEARTBEAT_S == 60.0
    assert sorted(lines) == [60, 120] and all(len(v) == 200 for v in lines.values())
    assert host.dumps > 10         # the table is still read (every min_gap_s)
    # a 30 s run: 200 lines (the scan), where every sweep used to make 200 x 30 = 6,000


def test_a_change_is_reported_at_the_next_sweep_once():
    host = Host()
    host.add(10_000)
    host.add(10_001)
    sw = standing(host)
    t0 = 0
    sw.scan(t0)
    quiet = sw.keys
    assert sw.sweep(1 * S, quiet) == []
    # unread bytes grow on one (a peer writing into a stuck reader)
    host.add(10_000, rqueue=60_000, mem=(61664,) + MEM[1:])
    (snap,) = sw.sweep(2 * S, quiet)
    assert (snap.lport, snap.unread_bytes, snap.volume, snap.ts_ns) == (10_000, 60_000, 61664,
                                                                        2 * S)
    assert sw.sweep(3 * S, quiet) == []
    # drops, then the peer's FIN (state), then the capacity: each reported once, when it comes
    host.add(10_001, mem=MEM[:8] + (3,))
    assert [(s.lport, s.drops) for s in sw.sweep(4 * S, quiet)] == [(10_001, 3)]
    host.add(10_001, mem=MEM[:8] + (3,), state="CLOSE_WAIT", rqueue=50_001)
    assert [(s.lport, s.tcp_state, s.unread_bytes) for s in sw.sweep(5 * S, quiet)] == [
        (10_001, "CLOSE_WAIT", 50_000)]
    host.add(10_000, rqueue=60_000, mem=(61664, 262144) + MEM[2:])
    assert [(s.lport, s.capacity) for s in sw.sweep(6 * S, quiet)] == [(10_000, 262144)]
    assert sw.sweep(7 * S, quiet) == []
    # and the heartbeat counts from each socket's last report
    assert sw.sweep(64 * S, quiet) == []
    assert keys(sw.sweep(65 * S, quiet)) == [10_001]     # last reported at 5 s
    assert keys(sw.sweep(66 * S, quiet)) == [10_000]     # at 6 s


def test_a_change_between_dumps_waits_for_the_dump():
    host = Host()
    host.add(10_000)
    sw = standing(host, floor_s=10.0)   # a dump at most every 10 s
    sw.scan(0)
    quiet = sw.keys
    host.add(10_000, rqueue=70_000)
    assert sw.sweep(5 * S, quiet) == []                 # the last dump's figures: unchanged
    assert [s.unread_bytes for s in sw.sweep(10 * S, quiet)] == [70_000]


def test_sockets_the_probe_saw_are_its_own_and_quiet_again_are_reported_at_once():
    host = Host()
    host.add(10_000)
    host.add(10_001)
    sw = standing(host)
    sw.scan(0)
    a, b = sorted(sw.keys)
    by_key = {s.sock_key: s.lport for s in sw._standing.values()}
    assert sw.sweep(1 * S, {a}) == []              # b had an event: the probe reports it
    assert sw.sweep(2 * S, {a}) == []
    (again,) = sw.sweep(3 * S, {a, b})             # b quiet again (its entry was evicted)
    assert again.sock_key == b and by_key[b] in (10_000, 10_001)
    assert sw.sweep(4 * S, {a, b}) == []


def test_drained_sockets_are_forgotten_and_reported_at_once_when_water_stands_again():
    host = Host()
    host.add(10_000)
    sw = standing(host)
    sw.scan(0)
    (key,) = sw.keys
    host.add(10_000, rqueue=0)                     # drained: no longer standing
    assert sw.sweep(1 * S, {key}) == [] and sw.keys == frozenset()
    host.add(10_000)                               # the same bytes stand again
    assert keys(sw.sweep(2 * S, {key})) == [10_000]


@pytest.mark.parametrize("heartbeat_s", [5.0, 0.0])
def test_the_heartbeat_is_a_constructor_argument(heartbeat_s):
    host = Host()
    host.add(10_000)
    sw = standing(host, heartbeat_s=heartbeat_s)
    sw.scan(0)
    got = [i for i in range(1, 12) if sw.sweep(i * S, sw.keys)]
    assert got == ([5, 10] if heartbeat_s else list(range(1, 12)))   # 0: every sweep, as before


def test_water_of_names_what_can_change():
    host = Host()
    host.add(10_000)
    (s,) = standing(host).scan(0)
    assert water_of(s) == (0, 51664, 50_000, 131072, 0, 0, "ESTABLISHED")
