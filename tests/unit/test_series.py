"""The metric series of the sockets (otelwater.export.series): which sockets get series of
their own, and how the rest are summed: by local port for what a process accepted, by peer
port for what it dialed (whose local ports are ephemeral)."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings, strategies as st

from otelwater import names as N
from otelwater.events.model import WaterSnapshot
from otelwater.export.series import SocketSeries, drops_series

PID = 4242


def snap(key, volume, lport, rport, role="", pid=PID, ts=1_000, drops=0):
    return WaterSnapshot(ts, key, pid, "svc", pid, 4026531840, "127.0.0.1", lport, "127.0.0.1",
                         rport, 1, volume, volume, 1 << 20, 0, drops, 0, "", 0, 0, "arrival",
                         "ESTABLISHED", 99 + key, role)


def test_a_clients_many_connections_are_one_series_by_the_servers_port():
    # Given a client holding 500 connections to port 5432 from 500 ephemeral ports, and a
    # server's 3 accepted connections on its port 8080
    ss = SocketSeries(top_n=2)
    for k in range(500):
        ss.fold(snap(k + 1, 10 + k, 40000 + k, 5432, role="dialed"))
    for k in range(3):
        ss.fold(snap(1000 + k, 1, 8080, 50000 + k, role="accepted"))
    # When the series are ranked
    ranking = ss.rank()
    # Then the top 2 have their own, and the rest are one sum per side and port
    others = [(s.attributes(), s.values[1]) for s in ranking.series if s.snapshot is None]
    assert len(ranking.series) == 2 + 2
    by_port = {(a.get(N.NETWORK_PEER_PORT), a.get(N.NETWORK_LOCAL_PORT)): v
               for a, v in others}
    assert by_port == {(5432, None): sum(10 + k for k in range(498)), (None, 8080): 3}
    assert all(a[N.SOCKET_KEY] == N.OTHER_SOCKETS and a[N.PROCESS_PID] == PID
               for a, _ in others)


def test_a_drops_series_follows_the_gauges_grouping():
    dialed = snap(1, 5, 40001, 6379, role="dialed")
    accepted = snap(2, 5, 9090, 50001, role="accepted")
    unknown = dataclasses.replace(accepted, role="", sock_key=3)
    assert drops_series(dialed, False)[1][N.NETWORK_PEER_PORT] == 6379
    assert N.NETWORK_LOCAL_PORT not in drops_series(dialed, False)[1]
    assert drops_series(accepted, False)[1][N.NETWORK_LOCAL_PORT] == 9090
    assert drops_series(unknown, False)[0] == drops_series(accepted, False)[0]
    assert drops_series(dialed, True)[0] == ("ds", 1, PID)


sockets = st.lists(
    st.tuples(st.integers(1, 3),                       # pid
              st.integers(1, 4),                       # local port
              st.integers(1, 4),                       # peer port
              st.sampled_from(["dialed", "accepted", ""]),
              st.integers(0, 5000)),                   # volume
    max_size=40)


@settings(max_examples=200, deadline=None)
@given(sockets, st.integers(0, 6))
def test_the_ranking_equals_a_brute_force_one(socks, top_n):
    # Given sockets folded in order (keys 1..n)
    ss = SocketSeries(top_n=top_n)
    snaps = [snap(i + 1, vol, lp, rp, role, pid=pid)
             for i, (pid, lp, rp, role, vol) in enumerate(socks)]
    for s in snaps:
        ss.fold(s)
    ranking = ss.rank()
    # Then the top N by (volume, unread, level, key) have series of their own...
    ordered = sorted(snaps, key=lambda s: (s.volume, s.unread_bytes, s.level, s.sock_key),
                     reverse=True)
    top = ordered[:top_n]
    assert ranking.top_keys == {s.sock_key for s in top}
    # ...and the rest are summed per (pid, the peer's port if dialed else its own)
    want: dict = {}
    for s in ordered[top_n:]:
        g = (s.pid, s.rport, True) if s.role == "dialed" else (s.pid, s.lport, False)
        want[g] = want.get(g, 0) + s.volume
    got = {s.sid[1:]: s.values[1] for s in ranking.series if s.snapshot is None}
    assert got == want
    # and no water is lost or counted twice
    assert sum(s.values[1] for s in ranking.series) == sum(s.volume for s in snaps)
