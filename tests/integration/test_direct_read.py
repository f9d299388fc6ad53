"""Direct reads of struct sock and tcp_sock (bpf/water.c, otw_refresh: loads through the kfunc
bpf_rdonly_cast instead of bpf_probe_read_kernel) against the probe reads they replace and
against the kernel's own figures (root, real BPF)."""

from __future__ import annotations

import pytest

from otelwater.probes import kernel
from otelwater.probes.kernel import WaterOptions, WaterProbe

from .loopback import Pair, ss

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]


def water_cflags() -> list[str]:
    from otelwater.probes import host
    from otelwater.probes.btf import kernel_offsets
    from otelwater.probes.loader import running_kernel_btf

    btf = running_kernel_btf()
    return kernel.build_cflags(kernel_offsets(btf), WaterOptions(), host.kfree_skb_has_rx_sk(),
                               kernel.sock_done_bit(btf))


def test_the_loader_turns_direct_reads_on_where_the_kernel_has_the_kfunc():
    from otelwater.probes import loader
    from otelwater.probes.btf import BtfError

    try:
        loader.running_kernel_btf().func_id("bpf_rdonly_cast")
    except BtfError:
        pytest.skip("this kernel has no bpf_rdonly_cast (before 6.2): probe reads")
    flags = dict(f[2:].split("=", 1) for f in loader.direct_read_cflags(water_cflags()))
    assert int(flags["OTW_KF_RDONLY_CAST"]) > 0, loader.direct_read_note
    assert int(flags["OTW_BTF_SOCK"]) > 0 and int(flags["OTW_BTF_TCP_SOCK"]) > 0
    # decided once per process, and never over the caller's own decision
    assert loader.direct_read_cflags(water_cflags()) == loader.direct_read_cflags(water_cflags())
    assert loader.direct_read_cflags(water_cflags() + ["-DOTW_KF_RDONLY_CAST=0"]) == []


def test_direct_and_probe_reads_see_the_same_socket(monkeypatch):
    # Given two water probes on the same sockets, one reading struct sock directly (the
    # default here) and one with probe reads, as before
    built = kernel.build_cflags
    pair = Pair()
    with WaterProbe(WaterOptions(ports=frozenset({pair.port}), seed=False)) as direct:
        monkeypatch.setattr(kernel, "build_cflags",
                            lambda *a, **k: built(*a, **k) + ["-DOTW_KF_RDONLY_CAST=0"])
        with WaterProbe(WaterOptions(ports=frozenset({pair.port}), seed=False)) as probed:
            monkeypatch.setattr(kernel, "build_cflags", built)
            assert "-DOTW_KF_RDONLY_CAST=0" in probed.cflags
            pair.connect()
            pair.client.sendall(b"hello")
            assert pair.server.recv(5) == b"hello"
            pair.fill(200_000, chunk=5000)
            # When the queue is still (the last event on it was an arrival)
            inq = pair.wait_still()
            truth = ss(pair.port, pair.client_port)

            def server_side(probe):
                snaps = [s for s in probe.poll() + probe.sweep(all_sockets=True)
                         if s.lport == pair.port and s.rport == pair.client_port]
                assert snaps
                return snaps[-1]

            a, b = server_side(direct), server_side(probed)
    pair.close()
    # Then both say the same, field for field, and it is what the kernel says
    fields = ("level", "volume", "unread_bytes", "capacity", "backlog", "drops",
              "bytes_arrived", "bytes_read", "pid")
    assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}
    assert inq > 0
    assert a.unread_bytes == inq == truth.recv_q
    assert a.volume == truth.r
    assert a.capacity == truth.rb
    assert a.bytes_arrived - a.bytes_read == inq
