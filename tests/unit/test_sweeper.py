"""The sweep's choice of sockets (kernel.Sweeper): every socket that moved, except a still one
(zero water now and at its last report, nothing else new); the last state of a queue that went
still is reported exactly (docs/design.md): a socket that goes from water to zero is reported at
zero, `still_reports` times, before the sweep goes quiet on it. With the default options the
alert stage and the rain-water figures see the same thing as with every snapshot."""

from __future__ import annotations

import random

from otelwater.alerts.stage import AlertStage
from otelwater.analysis.rainwater import RainGauges
from otelwater.config import AlertConfig
from otelwater.events.alert import AlertTransition
from otelwater.probes.kernel import STATE_FIELDS, StateDecoder, Sweeper, WaterOptions
from otelwater.sockkey import addr16

BASE = dict(sock_key=77, pid=42, comm=b"svc".ljust(16, b"\0"), netns=1,
            laddr=addr16("127.0.0.1"), lport=80, raddr=addr16("127.0.0.1"), rport=5000,
            level=0, volume=0, capacity=131072, backlog=0, drops=0, drop_events=0,
            drop_reason=0, rcv_nxt=1000, copied_seq=1000, fin=0, tcp_state=1, ino=9, role=2,
            changes=1, watched=1, last_emit_ns=0)


class Sock:
    """One socket table entry, moved by hand."""

    def __init__(self, mk=1, **kw):
        self.mk = mk
        self.f = dict(BASE, **kw)

    def move(self, nbytes=64, **kw):
        """Bytes arrive and are read (changes +2); kw: fields to set."""
        self.f["rcv_nxt"] += nbytes
        self.f["copied_seq"] = self.f["rcv_nxt"] - kw.pop("unread", 0)
        self.f["changes"] += 2
        self.f.update(kw)
        return self

    def entry(self):
        return self.mk, tuple(self.f[n] for n in STATE_FIELDS)


class Owners:
    def owner(self, ino):
        return (ino + 1000, "owner")


def sweeper(**kw) -> Sweeper:
    return Sweeper(StateDecoder({}), Owners(), **kw)


def run(sw, socks, now, all_sockets=False):
    out, keys = sw.sweep([s.entry() for s in socks], now, all_sockets)
    return out, keys


def test_a_still_socket_is_reported_still_reports_times_then_not():
    sw = sweeper(still_reports=3)
    s = Sock()
    got = [len(run(sw, [s.move()], t)[0]) for t in range(1, 8)]
    assert got == [1, 1, 1, 0, 0, 0, 0]
    assert sw.still_skipped == 4
    # a sweep where it did not move reports nothing, as always
    assert run(sw, [s], 9)[0] == []


def test_the_lead_rule_once_at_zero():
    sw = sweeper(still_reports=1)
    s = Sock()
    assert [len(run(sw, [s.move()], t)[0]) for t in range(1, 4)] == [1, 0, 0]


def test_water_then_zero_is_reported_at_zero():
    sw = sweeper(still_reports=1)
    s = Sock()
    run(sw, [s.move()], 1)
    run(sw, [s.move()], 2)                        # still: skipped
    out, _ = run(sw, [s.move(unread=10, level=1, volume=768)], 3)
    assert [x.unread_bytes for x in out] == [10]  # water: reported
    out, _ = run(sw, [s.move(level=0, volume=0)], 4)
    assert [(x.unread_bytes, x.level, x.volume) for x in out] == [(0, 0, 0)]   # zero: once
    assert run(sw, [s.move()], 5)[0] == []


def test_any_water_measure_counts():
    for kw in (dict(level=1), dict(volume=1), dict(backlog=1), dict(unread=1)):
        sw = sweeper(still_reports=1)
        s = Sock()
        run(sw, [s.move()], 1)
        assert run(sw, [s.move()], 2)[0] == []
        assert len(run(sw, [s.move(**kw)], 3)[0]) == 1, kw
    # the peer's FIN: one sequence number, no unread byte: still zero
    sw = sweeper(still_reports=1)
    s = Sock(fin=1)
    run(sw, [s.move()], 1)
    assert run(sw, [s.move(unread=1)], 2)[0] == []


def test_a_ring_buffer_record_since_the_last_report_is_news():
    sw = sweeper(still_reports=1)
    s = Sock()
    run(sw, [s.move()], 1)
    assert len(run(sw, [s.move(last_emit_ns=5)], 2)[0]) == 1   # it may have shown water
    assert run(sw, [s.move()], 3)[0] == []


def test_a_change_of_any_fact_is_news():
    changes = dict(pid=43, comm=b"other".ljust(16, b"\0"), drops=1, drop_events=1,
                   drop_reason=3, tcp_state=8, capacity=65536, role=1, fin=1, ino=10)
    for k, v in changes.items():
        sw = sweeper(still_reports=1)
        s = Sock()
        run(sw, [s.move()], 1)
        assert run(sw, [s.move()], 2)[0] == []
        out, _ = run(sw, [s.move(**{k: v})], 3)
        assert len(out) == 1, k
        assert run(sw, [s.move()], 4)[0] == [], k


def test_sockets_without_a_reader_are_always_reported():
    sw = sweeper(still_reports=1)
    s = Sock(pid=0)
    outs = [run(sw, [s.move()], t)[0] for t in range(1, 4)]
    assert [len(o) for o in outs] == [1, 1, 1]
    assert outs[0][0].pid == 1009 and outs[0][0].comm == "owner"


def test_still_reports_0_reports_every_move_and_all_sockets_reports_all():
    sw = sweeper(still_reports=0)
    s = Sock()
    assert [len(run(sw, [s.move()], t)[0]) for t in range(1, 5)] == [1, 1, 1, 1]
    sw = sweeper(still_reports=1)
    run(sw, [s.move()], 1)
    assert run(sw, [s.move()], 2)[0] == []
    assert len(run(sw, [s], 3, all_sockets=True)[0]) == 1
    assert len(run(sw, [s], 4, all_sockets=True)[0]) == 1


def test_still_ns_keeps_reporting_for_that_long():
    sw = sweeper(still_reports=1, still_ns=10)
    s = Sock()
    got = [len(run(sw, [s.move()], t)[0]) for t in (100, 105, 109, 110, 111)]
    assert got == [1, 1, 1, 0, 0]


def test_keys_name_every_watched_socket_and_unwatched_ones_are_left_out():
    sw = sweeper(still_reports=1)
    a, b, c = Sock(1, sock_key=1), Sock(2, sock_key=2), Sock(3, sock_key=3, watched=0)
    run(sw, [a.move(), b.move(), c.move()], 1)
    out, keys = run(sw, [a.move(), b, c.move()], 2)
    assert out == [] and keys == {1, 2}
    # a socket that left the table and comes back is reported as new
    run(sw, [b], 3)
    assert len(run(sw, [a.move()], 4)[0]) == 1


def test_the_default_is_the_alerts_surge_window():
    assert WaterOptions().still_reports >= AlertConfig().surge_window
    assert WaterOptions().still_ns >= AlertConfig().hold_ns


def test_alerts_and_rain_water_see_the_same_with_the_default():
    """Random sockets over 300 sweeps, water mostly zero: the alert stage's transitions and the
    rain-water figures (but their sample counts and spans) are the same whether the still
    snapshots are made or not."""
    rng = random.Random(7)
    socks = [Sock(i, sock_key=100 + i, ino=i) for i in range(12)]
    every, default = sweeper(still_reports=0), sweeper(**{
        "still_reports": WaterOptions().still_reports, "still_ns": WaterOptions().still_ns})
    a_all, a_def = AlertStage(AlertConfig()), AlertStage(AlertConfig())
    r_all, r_def = RainGauges(), RainGauges()
    t_all, t_def = [], []
    n_all = n_def = 0
    for sweep in range(300):
        now = (sweep + 1) * 1_000_000_000
        for s in socks:
            x = rng.random()
            if x < 0.1:
                s.move(level=rng.choice([1, 40, 200]), volume=rng.choice([768, 90000]),
                       unread=rng.choice([10, 5000]))
            elif x < 0.8:
                s.move(level=0, volume=0)
            elif x < 0.82:
                s.move(level=0, volume=0, last_emit_ns=now - 5)
            # else: it does not move
        entries = [s.entry() for s in socks]
        out_all, _ = every.sweep(entries, now)
        out_def, _ = default.sweep(entries, now)
        n_all += len(out_all)
        n_def += len(out_def)
        t_all += [t for t in a_all.feed(out_all) if type(t) is AlertTransition]
        t_def += [t for t in a_def.feed(out_def) if type(t) is AlertTransition]
        for x in out_all:
            r_all.add(x)
        for x in out_def:
            r_def.add(x)
    assert n_def < n_all * 0.6          # the still snapshots were most of them
    assert t_all and t_def == t_all     # some alerts fired and cleared, the same ones
    for s in socks:
        fa, fd = r_all.figure(s.f["sock_key"]), r_def.figure(s.f["sock_key"])
        assert (fa.rain_water, fa.standing, fa.envelope, fa.peak) == \
            (fd.rain_water, fd.standing, fd.envelope, fd.peak)


def test_listeners_of_a_namespace_are_read_once(monkeypatch):
    """The sweep teaches the kernel the listeners of each traced process's namespace: read
    once per namespace (a stat per process after that, not a parse of its TCP table)."""
    import os

    from otelwater.probes import kernel as K

    parsed = []

    def listening(pid):
        parsed.append(pid)
        return os.stat(f"/proc/{pid}/ns/net").st_ino, {8080, 9090}

    monkeypatch.setattr(K, "listening", listening)
    told: dict = {}

    class Table(dict):
        def __setitem__(self, k, v):
            told[k.value] = v.value

    p = K.WaterProbe.__new__(K.WaterProbe)
    p._bpf = {"listen_ports": Table()}
    p._netns_seen = set()
    for _ in range(3):
        p.learn_listeners(("self", os.getpid(), 999_999_999))     # the last: no such process
    netns = os.stat("/proc/self/ns/net").st_ino
    assert parsed == ["self"]
    assert set(told) == {netns << 16 | 8080, netns << 16 | 9090}
