"""otelwater.probes.btf against the running kernel's BTF, checked by an independent reader.

The independent reader is bpftool + clang: ``bpftool btf dump file /sys/kernel/btf/vmlinux
format c`` writes vmlinux.h (libbpf's BTF decoder), and clang computes ``__builtin_offsetof``,
``sizeof`` and enumerator values from it. The values are compiled into an array in a BPF object
(``clang -target bpf -c``, the target vmlinux.h is written for) and read back from its
``.rodata`` with pyelftools. Needs no root: /sys/kernel/btf/vmlinux is world-readable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from otelwater.probes import btf as B
from otelwater.probes.btf import Btf, drop_reasons, kernel_offsets

VMLINUX = Path(B.VMLINUX_BTF)


def _require() -> tuple[str, str]:
    if not VMLINUX.exists():
        pytest.skip(f"{VMLINUX} is missing: the kernel has no CONFIG_DEBUG_INFO_BTF")
    bpftool = shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if Path(p).exists()), None)
    if bpftool is None:
        pytest.skip("bpftool is not installed (scripts/setup.sh installs it)")
    clang = shutil.which("clang") or shutil.which("clang-14")
    if clang is None:
        pytest.skip("clang is not installed (scripts/setup.sh installs it)")
    return bpftool, clang


@pytest.fixture(scope="module")
def kbtf() -> Btf:
    _require()
    return Btf.load()


@pytest.fixture(scope="module")
def vmlinux_h(tmp_path_factory) -> Path:
    bpftool, _ = _require()
    out = tmp_path_factory.mktemp("vmlinux") / "vmlinux.h"
    with out.open("wb") as f:
        subprocess.run([bpftool, "btf", "dump", "file", str(VMLINUX), "format", "c"],
                       stdout=f, check=True)
    return out


def _clang_values(vmlinux_h: Path, exprs: list[str], ctype: str = "unsigned long long",
                  extra: str = "") -> list[int]:
    """Evaluate constant C expressions against vmlinux.h with clang; return their values."""
    from elftools.elf.elffile import ELFFile

    _, clang = _require()
    d = vmlinux_h.parent
    src = d / f"vals_{abs(hash(tuple(exprs)))}.c"
    body = ",\n".join(f"\t({ctype})({e})" for e in exprs)
    src.write_text(
        "#define BPF_NO_PRESERVE_ACCESS_INDEX\n"
        f'#include "{vmlinux_h}"\n{extra}\n'
        f"const volatile {ctype} vals[] = {{\n{body}\n}};\n")
    obj = src.with_suffix(".o")
    r = subprocess.run([clang, "-target", "bpf", "-O2", "-c", str(src), "-o", str(obj)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"clang failed on {src}:\n{r.stderr[-4000:]}"
    with obj.open("rb") as f:
        elf = ELFFile(f)
        sym = next(s for s in elf.get_section_by_name(".symtab").iter_symbols()
                   if s.name == "vals")
        sec = elf.get_section(sym["st_shndx"])
        data = sec.data()[sym["st_value"]:sym["st_value"] + sym["st_size"]]
    width = 8
    assert len(data) == width * len(exprs)
    signed = not ctype.startswith("unsigned")
    return [int.from_bytes(data[i:i + width], "little", signed=signed)
            for i in range(0, len(data), width)]


def test_parse_is_fast():
    _require()
    best = min(_timed_load() for _ in range(3))
    assert best < 2.0, f"parsing {VMLINUX} took {best:.2f} s"


def _timed_load() -> float:
    t = time.perf_counter()
    Btf.load()
    return time.perf_counter() - t


def test_kernel_offsets_match_clang(kbtf, vmlinux_h):
    offs = kernel_offsets(kbtf)
    exprs, names = [], []
    for macro in B.KERNEL_FIELDS:
        struct_name, path = B.kernel_field(kbtf, macro)
        if kbtf.member(struct_name, path).is_bitfield:
            continue  # offsetof cannot name a bitfield; covered by the unit fixture
        names.append(macro)
        exprs.append(f"__builtin_offsetof(struct {struct_name}, {path})")
    for size_macro, off_macro in B.KERNEL_SIZES.items():
        struct_name, path = B.kernel_field(kbtf, off_macro)
        if kbtf.member(struct_name, path).is_bitfield:
            continue
        names.append(size_macro)
        exprs.append(f"sizeof(((struct {struct_name} *)0)->{path})")
    want = dict(zip(names, _clang_values(vmlinux_h, exprs)))
    assert {k: offs[k] for k in want} == want
    assert "OFF_SK_RCVQ_QLEN" in want and "SIZE_SK_DROPS" in want


def test_more_offsets_and_sizes_match_clang(kbtf, vmlinux_h):
    """A wider sample than the probe needs: anonymous unions, cacheline groups, arrays."""
    fields = [
        ("sock", "__sk_common.skc_portpair"), ("sock", "__sk_common.skc_cookie"),
        ("sock", "__sk_common.skc_refcnt"), ("sock", "__sk_common.skc_rxhash"),
        ("sock", "sk_wq"), ("sock", "sk_data_ready"), ("sock", "sk_policy[1]"),
        ("sock", "sk_send_head"), ("sock", "tcp_rtx_queue"), ("sock", "sk_write_queue.qlen"),
        ("sock", "sk_backlog.tail"), ("sock", "sk_type"), ("sock", "sk_lock"),
        ("tcp_sock", "snd_nxt"), ("tcp_sock", "srtt_us"), ("tcp_sock", "bytes_received"),
        ("tcp_sock", "inet_conn.icsk_inet.sk.sk_rcvbuf"),
        ("inet_sock", "inet_sport"), ("files_struct", "fd_array[5]"),
        ("task_struct", "tgid"), ("task_struct", "pid"), ("task_struct", "comm"),
        ("net", "ns.inum"), ("socket_alloc", "vfs_inode.i_ino"), ("sk_buff", "len"),
    ]
    fields = [(s, p) for s, p in fields if kbtf.has_member(s, p)]
    assert len(fields) >= 20
    exprs = [f"__builtin_offsetof(struct {s}, {p})" for s, p in fields]
    exprs += [f"sizeof(((struct {s} *)0)->{p})" for s, p in fields]
    types = ["struct sock", "struct tcp_sock", "struct task_struct", "struct net",
             "struct file", "struct socket", "possible_net_t", "atomic_t", "struct in6_addr"]
    exprs += [f"sizeof({t})" for t in types]
    got = _clang_values(vmlinux_h, exprs)
    n = len(fields)
    assert [kbtf.offsetof(s, p) for s, p in fields] == got[:n]
    assert [kbtf.member_size(s, p) for s, p in fields] == got[n:2 * n]
    assert [kbtf.sizeof(t) for t in types] == got[2 * n:]


def test_skb_drop_reason_matches_clang(kbtf, vmlinux_h):
    values = kbtf.enum_values("skb_drop_reason")
    names = list(values)
    got = _clang_values(vmlinux_h, names, ctype="long long")
    assert dict(zip(names, got)) == values
    # ... and none is missing: count the enumerators in vmlinux.h's definition.
    text = vmlinux_h.read_text()
    m = re.search(r"^enum skb_drop_reason \{\n(.*?)^\};", text, re.S | re.M)
    assert m, "vmlinux.h has no enum skb_drop_reason"
    declared = re.findall(r"^\s*([A-Z0-9_]+)\s*=", m.group(1), re.M)
    assert declared == names
    reasons = drop_reasons(kbtf)
    assert reasons[values["SKB_DROP_REASON_NO_SOCKET"]] == "NO_SOCKET"
    assert reasons[values["SKB_DROP_REASON_NOT_SPECIFIED"]] == "NOT_SPECIFIED"
    # (6.18 has no TCP_RMEM reason; a full receive buffer is SOCKET_RCVBUFF or PROTO_MEM)
    for short in ("PROTO_MEM", "SOCKET_RCVBUFF", "SOCKET_BACKLOG"):
        assert short in reasons.values()
    assert "MAX" not in reasons.values() and "SUBSYS_MASK" not in reasons.values()


def test_anonymous_tcp_state_enum(kbtf, vmlinux_h):
    names = ["TCP_ESTABLISHED", "TCP_SYN_RECV", "TCP_CLOSE", "TCP_LISTEN"]
    assert [kbtf.enumerator(n) for n in names] == _clang_values(vmlinux_h, names)


def test_missing_members_are_detected(kbtf):
    assert not kbtf.has_member("sock", "sk_no_such_field")
    assert not kbtf.has_member("no_such_struct_xyz", "x")
    assert kbtf.has_member("struct sock", "__sk_common.skc_family")


def test_tcp_states_of_water_h_match_the_running_kernel(kbtf):
    from otelwater.probes.kernel import check_tcp_states

    check_tcp_states(kbtf)  # raises ProbeLoadError naming any state that differs
