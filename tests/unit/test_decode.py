"""The ring-buffer and socket-table decoders (struct.Struct, caches) make exactly the records the
ctypes field-by-field decoders made: every field equal, of the same type, for records of every
shape (goid or not, tracepoint or uprobe, evidence bits, IPv4/IPv6 peers, stacks longer than
the record holds, comm names that are not UTF-8, negative fds and errnos). The references below
are the decoders as they were (otelwater/probes/goread.py _record, kernel.py
snapshot_from_state before the struct decoders), over ctypes objects.
"""

from __future__ import annotations

import ctypes
import random

import pytest

from otelwater.events.model import ROLES, TCP_STATES, TRIGGERS, ReadRecord, WaterSnapshot
from otelwater.probes import goread as G
from otelwater.probes import kernel as K
from otelwater.sockkey import addr16, addr_text
from tests.goexamples import built, versions

_D = G._D


# -- the references (the ctypes decoders as they were) ---------------------------------------
def ref_snapshot(st, ts_ns, tid, trigger, drop_names, owner=None) -> WaterSnapshot:
    pid, comm = st.pid, st.comm.decode(errors="replace")
    if not pid and owner:
        pid, comm = owner
    return WaterSnapshot(
        ts_ns=ts_ns, sock_key=st.sock_key, pid=pid, comm=comm, tid=tid, netns=st.netns,
        laddr=addr_text(bytes(st.laddr)), lport=st.lport,
        raddr=addr_text(bytes(st.raddr)), rport=st.rport,
        level=st.level, volume=st.volume,
        unread_bytes=K.unread_bytes(st.rcv_nxt, st.copied_seq, st.fin),
        capacity=st.capacity, backlog=st.backlog, drops=st.drops,
        drop_events=st.drop_events,
        drop_reason=drop_names.get(st.drop_reason, str(st.drop_reason)) if st.drop_events else "",
        bytes_arrived=st.rcv_nxt, bytes_read=st.copied_seq,
        trigger=TRIGGERS.get(trigger, str(trigger)),
        tcp_state=TCP_STATES.get(st.tcp_state, ""), ino=st.ino, role=ROLES.get(st.role, ""),
    )


def ref_record(s, e) -> ReadRecord:
    pid = e.pid
    binary = s._binary_of(pid)
    n = min(int(e.stack_len), len(e.ips))
    ips = [int(e.ips[i]) for i in range(n)]
    if e.caller_ip and ips:
        ips.insert(1, int(e.caller_ip))
    stack: tuple[str, ...] = ()
    if binary is not None and ips:
        stack = tuple(binary.name(ip) for ip in ips)
    elif ips:
        stack = tuple(f"0x{ip:x}" for ip in ips)
    return ReadRecord(
        ts_start_ns=e.ts_start_ns, ts_end_ns=e.ts_end_ns, pid=pid, tid=e.tid,
        goid=int(e.goid) if e.has_goid else None, fd=e.fd, sock_key=e.sock_key,
        requested=e.requested, returned=e.returned, stack=stack,
        source=G.SOURCES.get(e.source, str(e.source)),
        comm=e.comm.decode(errors="replace"),
        parked=(bool(e.parked) if e.source == _D["OTW_SOURCE_TRACEPOINT"]
                or e.evidence & _D["OTW_EV_SOCKET"] else None),
        ts_arrival_ns=int(e.arrival_ns) or None,
        queue_delay_ns=int(e.queue_delay_ns) if e.evidence & _D["OTW_EV_QDELAY"] else None,
        queue_delay_exact=(bool(e.evidence & _D["OTW_EV_EXACT"])
                           if e.evidence & _D["OTW_EV_QDELAY"] else None),
        role=ROLES.get(e.role, ""),
        peer_addr=addr_text(bytes(e.raddr)) if e.rport else "",
        peer_port=int(e.rport),
        ts_send_ns=int(e.send_ns) or None,
        ts_prev_arrival_ns=(int(e.prev_arrival_ns) or None) if e.parked else None,
        kernel_verdict=G.KERNEL_VERDICTS.get(e.kverdict),
    )


def same(a, b) -> None:
    """Equal field by field, and of the same type (True == 1 would hide a bool turned int)."""
    assert type(a) is type(b)
    for name in type(a).__slots__:
        x, y = getattr(a, name), getattr(b, name)
        assert x == y and type(x) is type(y), (name, x, y)


# -- random raw records -------------------------------------------------------------------------
COMMS = [b"slowreader", b"", b"x" * 15, "caf\u00e9".encode(), b"\xff\xfe bad", b"a\x00b",
         "\u6f22\u5b57".encode(), b"tab\there"]
ADDRS = [addr16("127.0.0.1"), addr16("10.1.2.3"), addr16("::1"), addr16("2001:db8::7"),
         bytes(16)]


def put(arr, raw: bytes) -> None:
    ctypes.memmove(arr, raw, len(raw))


def random_read_event(rng: random.Random, pids, ips) -> G.GoReadEvent:
    e = G.GoReadEvent()
    e.ts_start_ns = rng.randrange(1, 1 << 50)
    e.ts_end_ns = e.ts_start_ns + rng.randrange(1 << 30)
    e.pid = rng.choice(pids)
    e.tid = rng.randrange(1 << 22)
    e.has_goid = rng.random() < 0.8
    e.goid = rng.randrange(1 << 40)
    e.fd = rng.choice([-1, 0, 3, 4095, 70000])
    e.sock_key = rng.randrange(1 << 64)
    e.requested = rng.choice([0, 4096, 1 << 40])
    e.returned = rng.choice([-11, -104, 0, 64, 4096])
    n = rng.choice([0, 1, 2, 5, G.STACK_DEPTH, G.STACK_DEPTH + 7])
    for i in range(min(n, G.STACK_DEPTH)):
        e.ips[i] = rng.choice(ips)
    e.stack_len = n
    e.caller_ip = rng.choice([0, 0, rng.choice(ips)])
    e.source = rng.choice([_D["OTW_SOURCE_TRACEPOINT"], _D["OTW_SOURCE_UPROBE"], 9])
    e.comm = rng.choice(COMMS)[:16]   # a char array: assigned (reading it gives a copy)
    e.parked = rng.choice([0, 1])
    e.evidence = rng.randrange(32)
    e.arrival_ns = rng.choice([0, rng.randrange(1 << 50)])
    e.queue_delay_ns = rng.choice([0, rng.randrange(1 << 30)])
    e.role = rng.choice([0, 1, 2, 7])
    put(e.raddr, rng.choice(ADDRS))
    e.rport = rng.choice([0, 443, 65535])
    e.send_ns = rng.choice([0, rng.randrange(1 << 50)])
    e.prev_arrival_ns = rng.choice([0, rng.randrange(1 << 50)])
    e.kverdict = rng.randrange(8)
    e.lost_before = rng.choice([0, 0, 3])
    e.lost_since_ns = rng.randrange(1 << 50)
    e.lost_until_ns = rng.randrange(1 << 50)
    return e


def random_state(rng: random.Random, st) -> None:
    st.sock_key = rng.randrange(1 << 64)
    st.ino = rng.randrange(1 << 40)
    st.last_ts_ns = rng.randrange(1 << 50)
    st.last_emit_ns = rng.randrange(1 << 50)
    st.changes = rng.randrange(1 << 20)
    put(st.laddr, rng.choice(ADDRS))
    put(st.raddr, rng.choice(ADDRS))
    st.pid = rng.choice([0, 1, 4242])
    st.netns = rng.randrange(1 << 32)
    for f in ("level", "volume", "capacity", "backlog", "drops", "rcv_nxt", "copied_seq",
              "drop_events"):
        setattr(st, f, rng.choice([0, 1, 2, 65536, (1 << 32) - 1, rng.randrange(1 << 32)]))
    st.drop_reason = rng.choice([0, 2, 77, 100000])
    st.lport = rng.randrange(1 << 16)
    st.rport = rng.randrange(1 << 16)
    st.watched = rng.choice([0, 1])
    st.tcp_state = rng.randrange(13)
    st.comm = rng.choice(COMMS)[:16]
    st.fin = rng.choice([0, 1])
    st.role = rng.choice([0, 1, 2, 5])


class _FakeOwners:
    def owner(self, ino):
        return (ino % 1000 + 1, "owner\u00e9") if ino % 3 else None


# -- water ----------------------------------------------------------------------------------
def test_water_event_decodes_as_the_ctypes_decoder_did():
    rng = random.Random(1)
    drop_names = {2: "NOT_SPECIFIED", 77: "TCP_OFOMERGE"}
    dec = K.StateDecoder(drop_names)
    owners = _FakeOwners()
    for _ in range(3000):
        e = K.WaterEvent()
        random_state(rng, e.s)
        e.ts_ns, e.tid, e.trigger = rng.randrange(1 << 50), rng.randrange(1 << 22), rng.randrange(8)
        raw = bytes(e)
        v = K.EVENT_FIELDS(K.EVENT_STRUCT.unpack_from(raw))
        owner = owners.owner(e.s.ino) if not e.s.pid else None
        assert v[K.N_STATE:K.N_STATE + 3] == (e.ts_ns, e.tid, e.trigger)
        same(dec.snapshot(v, e.ts_ns, e.tid, e.trigger, owner),
             ref_snapshot(e.s, e.ts_ns, e.tid, e.trigger, drop_names, owner))


def test_socket_table_entries_decode_as_the_ctypes_decoder_did():
    rng = random.Random(2)
    dec = K.StateDecoder({})
    for _ in range(2000):
        ws = K.WaterSock()
        random_state(rng, ws.s)
        for i in range(len(ws.a.ts_ns)):     # the arrival ring: not part of the state
            ws.a.ts_ns[i] = rng.randrange(1 << 64)
        v = K.SOCK_FIELDS(K.SOCK_STRUCT.unpack(bytes(ws)))
        assert v[K.N_STATE - 3:] == (ws.s.changes, ws.s.watched, ws.s.last_emit_ns)
        same(dec.snapshot(v, 5, 0, K.TRIGGER_PERIODIC),
             ref_snapshot(ws.s, 5, 0, K.TRIGGER_PERIODIC, {}))


def test_layouts_are_the_headers():
    for ctype, st in ((K.WaterEvent, K.EVENT_STRUCT), (K.WaterSock, K.SOCK_STRUCT),
                      (G.GoReadEvent, G.EVENT_STRUCT)):
        assert st.size == ctypes.sizeof(ctype)
    # the positional constructors follow these field orders
    assert WaterSnapshot.__slots__ == (
        "ts_ns", "sock_key", "pid", "comm", "tid", "netns", "laddr", "lport", "raddr", "rport",
        "level", "volume", "unread_bytes", "capacity", "backlog", "drops", "drop_events",
        "drop_reason", "bytes_arrived", "bytes_read", "trigger", "tcp_state", "ino", "role")
    assert ReadRecord.__slots__ == (
        "ts_start_ns", "ts_end_ns", "pid", "tid", "goid", "fd", "sock_key", "requested",
        "returned", "stack", "source", "comm", "parked", "ts_arrival_ns", "queue_delay_ns",
        "queue_delay_exact", "role", "peer_addr", "peer_port", "ts_send_ns",
        "ts_prev_arrival_ns", "kernel_verdict", "trace_id", "parent_span_id", "link_note",
        "go_start")


# -- Go reads ---------------------------------------------------------------------------------
def bare_sampler(binary=None) -> G.GoReadSampler:
    """A sampler with no BPF behind it: what _record uses."""
    s = G.GoReadSampler.__new__(G.GoReadSampler)
    s.opts = G.GoReadOptions()
    s._stacks, s._comms, s._addrs, s._starts = {}, {}, {}, {}
    s._pid_binary = {1: binary, 2: binary} if binary is not None else {}
    s._bias = {}
    s._said, s._notices = set(), []
    return s


@pytest.mark.parametrize("with_binary", [False, True])
def test_go_read_decodes_as_the_ctypes_decoder_did(with_binary):
    binary = None
    ips = [0x401000 + 0x40 * i for i in range(20)] + [0xdeadbeef]
    if with_binary:
        binary = G._Binary(built(versions()[0], "slowreader"), need_go=False)
        starts = binary.symbolizer._starts
        ips = [starts[i] + 3 for i in range(0, len(starts), max(1, len(starts) // 40))]
        ips.append(1)   # resolves to nothing: shown as an address
    rng = random.Random(3)
    s = bare_sampler(binary)
    ref = bare_sampler(binary)
    for _ in range(3000):
        e = random_read_event(rng, [1, 2, 3], ips)
        v = G.EVENT_VALUES(G.EVENT_STRUCT.unpack_from(bytes(e)))
        assert v[G._LOST:G._LOST + 3] == (e.lost_before, e.lost_since_ns, e.lost_until_ns)
        got = s._record(v)
        same(got, ref_record(ref, e))
    assert s._stacks      # stacks were cached, and the cached ones were the same


def test_caches_are_bounded(monkeypatch):
    monkeypatch.setattr(G, "CACHE_MAX", 8)
    monkeypatch.setattr(K, "CACHE_MAX", 8)
    rng = random.Random(4)
    s = bare_sampler()
    ref = bare_sampler()
    for _ in range(200):
        e = random_read_event(rng, list(range(50)), [rng.randrange(1 << 40) for _ in range(64)])
        same(s._record(G.EVENT_VALUES(G.EVENT_STRUCT.unpack_from(bytes(e)))), ref_record(ref, e))
        assert len(s._stacks) <= 8 and len(s._comms) <= 8 and len(s._addrs) <= 8
    dec = K.StateDecoder({})
    for i in range(50):
        dec.addr(addr16(f"10.0.0.{i}"))
        assert len(dec._addrs) <= 8


def test_record_maker_makes_what_the_constructor_makes():
    import dataclasses

    assert K._Snapshot is not WaterSnapshot and G._Read is not ReadRecord   # the fast ones
    rng = random.Random(6)
    for cls in (WaterSnapshot, ReadRecord):
        make = K.record_maker(cls)
        for _ in range(50):
            vals = [rng.choice([0, 1, "x", None, (), ("a",), True]) for _ in cls.__slots__]
            a, b = make(*vals), cls(*vals)
            same(a, b)
            assert a == b and hash(a) == hash(b) and repr(a) == repr(b)
            with pytest.raises(dataclasses.FrozenInstanceError):
                a.pid = 5
        with pytest.raises(TypeError):
            make(*vals[:-1])             # every field, always

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        x: int

        def __post_init__(self):
            raise ValueError

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        x: int

    assert K.record_maker(Checked) is Checked and K.record_maker(NoSlots) is NoSlots
