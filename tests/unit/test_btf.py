"""otelwater.probes.btf on small blobs: no kernel, no root.

Two sources of BTF:
- tests/fixtures/btf/layout.btf: the .BTF section clang emits for layout.c (kernel-shaped
  structs), checked against expected.json, which the native compiler's offsetof/sizeof wrote for
  the same C (tests/fixtures/btf/make.sh regenerates both);
- blobs built here by ``Builder`` for what clang 14 does not emit (ENUM64, signed enums,
  kind_flag=0 bitfields, every kind, big-endian, a longer header, corrupt blobs).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otelwater.errors import EnvironmentProblem, NoBTF
from otelwater.probes import btf as B
from otelwater.probes.btf import (
    Btf,
    BtfBitfieldError,
    BtfError,
    BtfFormatError,
    BtfLookupError,
    BtfUnavailable,
    drop_reasons,
    kernel_offsets,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "btf"
BLOB = (FIXTURES / "layout.btf").read_bytes()
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf.load(str(FIXTURES / "layout.btf"))


# ---------------------------------------------------------------------- a BTF writer for tests

class Builder:
    """Writes BTF blobs type by type (ids from 1, in call order)."""

    def __init__(self, endian: str = "<"):
        self.e = endian
        self.strings = bytearray(b"\0")
        self.types: list[bytes] = []

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str = "", vlen: int = 0, kflag: int = 0, st_: int = 0,
            extra: bytes = b"") -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types.append(struct.pack(self.e + "III", self.s(name), info, st_) + extra)
        return len(self.types)

    def int_(self, name: str, size: int, bits: int | None = None, signed: bool = False,
             offset: int = 0) -> int:
        enc = (1 if signed else 0) << 24 | offset << 16 | (bits if bits is not None else size * 8)
        return self.add(B.KIND_INT, name, st_=size, extra=struct.pack(self.e + "I", enc))

    def ptr(self, t: int) -> int:
        return self.add(B.KIND_PTR, st_=t)

    def array(self, elem: int, index: int, n: int) -> int:
        return self.add(B.KIND_ARRAY, extra=struct.pack(self.e + "III", elem, index, n))

    def composite(self, name: str, size: int, members, union: bool = False,
                  kflag: int | None = None) -> int:
        """members: (name, type, bit_offset[, bitfield_size])."""
        if kflag is None:
            kflag = int(any(len(m) > 3 and m[3] for m in members))
        extra = b""
        for m in members:
            mname, mtype, bit = m[:3]
            bsize = m[3] if len(m) > 3 else 0
            off = (bsize << 24 | bit) if kflag else bit
            extra += struct.pack(self.e + "III", self.s(mname), mtype, off)
        kind = B.KIND_UNION if union else B.KIND_STRUCT
        return self.add(kind, name, len(members), kflag, size, extra)

    def enum(self, name: str, values: dict[str, int], signed: bool = False, size: int = 4) -> int:
        extra = b"".join(struct.pack(self.e + "Ii", self.s(k), v if v < 1 << 31 else v - (1 << 32))
                         for k, v in values.items())
        return self.add(B.KIND_ENUM, name, len(values), int(signed), size, extra)

    def enum64(self, name: str, values: dict[str, int], signed: bool = False) -> int:
        extra = b""
        for k, v in values.items():
            v &= (1 << 64) - 1
            extra += struct.pack(self.e + "III", self.s(k), v & 0xFFFFFFFF, v >> 32)
        return self.add(B.KIND_ENUM64, name, len(values), int(signed), 8, extra)

    def simple(self, kind: int, t: int = 0, name: str = "") -> int:
        return self.add(kind, name, st_=t)

    def build(self, hdr_extra: bytes = b"", magic: int = B.BTF_MAGIC, version: int = 1) -> bytes:
        types = b"".join(self.types)
        strings = bytes(self.strings)
        hdr_len = 24 + len(hdr_extra)
        hdr = struct.pack(self.e + "HBBIIIII", magic, version, 0, hdr_len, 0, len(types),
                          len(types), len(strings))
        return hdr + hdr_extra + types + strings


# ---------------------------------------------------------------------- the clang fixture

@pytest.mark.parametrize("f", EXPECTED["fields"], ids=lambda f: f"{f['struct']}.{f['path']}")
def test_offsets_match_c_compiler(btf, f):
    assert btf.offsetof(f["struct"], f["path"]) == f["offset"]
    assert btf.offsetof("struct " + f["struct"], f["path"]) == f["offset"]
    assert btf.member_size(f["struct"], f["path"]) == f["size"]
    assert btf.has_member(f["struct"], f["path"])


@pytest.mark.parametrize("name,size", EXPECTED["sizes"].items())
def test_sizeof_matches_c_compiler(btf, name, size):
    assert btf.sizeof(name) == size


@pytest.mark.parametrize("f", EXPECTED["bitfields"], ids=lambda f: f"{f['struct']}.{f['path']}")
def test_bitfields(btf, f):
    m = btf.member(f["struct"], f["path"])
    assert m.is_bitfield
    assert (m.bit_offset, m.bitfield_size) == (f["bit_offset"], f["bits"])
    if f["bit_offset"] % 8 == 0 and f["bits"] % 8 == 0:
        # byte-aligned whole-byte bitfields are read as plain bytes (pre-5.6 sk_protocol:8)
        assert btf.offsetof(f["struct"], f["path"]) == f["bit_offset"] // 8
        assert btf.member_size(f["struct"], f["path"]) == f["bits"] // 8
    else:
        with pytest.raises(BtfBitfieldError, match=f["path"]):
            btf.offsetof(f["struct"], f["path"])
        with pytest.raises(BtfBitfieldError):
            btf.member_size(f["struct"], f["path"])
        assert btf.has_member(f["struct"], f["path"])  # it exists, it just is not readable


def test_bitfield_cases_cover_both_policies():
    aligned = [f for f in EXPECTED["bitfields"] if f["bit_offset"] % 8 == 0 and f["bits"] % 8 == 0]
    assert {f["path"] for f in aligned} >= {"sk_protocol", "sk_type"}
    assert len(aligned) < len(EXPECTED["bitfields"])


def test_enum_values(btf):
    want = EXPECTED["enums"]["skb_drop_reason"]
    assert btf.enum_values("skb_drop_reason") == want
    assert btf.enum_values("enum skb_drop_reason") == want
    assert list(btf.enum_values("skb_drop_reason")) == list(want)  # declaration order
    assert btf.enum_values("drop_reason_t") == want  # through a typedef


def test_enum_kind_flag_zero_reads_unsigned(btf):
    # clang 14 emits kind_flag=0 ("unsigned") even for negative enumerators; the BTF spec and
    # bpftool read such values as u32, and so does the reader.
    got = btf.enum_values("signed_things")
    assert got == {k: v & 0xFFFFFFFF for k, v in EXPECTED["enums"]["signed_things"].items()}


def test_anonymous_enum_by_enumerator(btf):
    for k, v in EXPECTED["enums"]["(anon)"].items():
        assert btf.enumerator(k) == v
    assert btf.enumerator("SKB_DROP_REASON_NO_SOCKET") == 3
    with pytest.raises(BtfLookupError, match="NO_SUCH_THING"):
        btf.enumerator("NO_SUCH_THING")


def test_drop_reasons(btf):
    assert drop_reasons(btf) == {
        0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED", 2: "NOT_SPECIFIED", 3: "NO_SOCKET",
        7: "PROTO_MEM", 8: "TCP_RMEM",
    }


def test_kernel_offsets_on_fixture(btf):
    ex = {(f["struct"], f["path"]): f for f in EXPECTED["fields"]}
    offs = kernel_offsets(btf)
    assert set(offs) == set(B.KERNEL_FIELDS) | set(B.KERNEL_SIZES)
    for macro, (s, path) in B.KERNEL_FIELDS.items():
        if macro == "OFF_SK_PROTOCOL":
            continue
        assert offs[macro] == ex[(s, path)]["offset"], macro
    bf = {f["path"]: f for f in EXPECTED["bitfields"]}
    assert offs["OFF_SK_PROTOCOL"] == bf["sk_protocol"]["bit_offset"] // 8
    assert offs["SIZE_SK_PROTOCOL"] == 1  # the fixture has the pre-5.6 `sk_protocol:8`
    assert offs["SIZE_SK_DROPS"] == 4


def test_kernel_offsets_names_every_missing_field():
    b = Builder()
    u32 = b.int_("unsigned int", 4)
    b.composite("sock", 8, [("sk_rcvbuf", u32, 0), ("sk_drops", u32, 32)])
    with pytest.raises(BtfLookupError) as ei:
        kernel_offsets(Btf.from_bytes(b.build()))
    msg = str(ei.value)
    assert "OFF_SK_RCVQ_QLEN" in msg and "OFF_TCP_RCV_NXT" in msg and "tcp_sock" in msg
    assert "OFF_SK_RCVBUF" not in msg


def test_member_describes_types(btf):
    m = btf.member("sock", "sk_drops")
    assert (m.type_name, m.size, m.offset, m.is_bitfield) == ("atomic_t", 4, m.bit_offset // 8, False)
    assert btf.member("sock", "__sk_common.skc_net.net").type_name == "struct net *"
    assert btf.member("sock", "sk_cv").type_name == "const volatile u64"
    assert btf.member("tcp_sock", "tail").size == 0  # flexible array
    assert btf.member("task_struct", "files").type_name == "const struct files_struct *"


def test_type_counts_and_names(btf):
    assert btf.type_count > 50
    tid = btf.type_id("struct sock")
    assert btf.kind(tid) == "STRUCT" and btf.name(tid) == "sock"
    assert btf.name(0) == "void"


# ---------------------------------------------------------------------- lookup errors

def test_missing_struct(btf):
    with pytest.raises(BtfLookupError, match="no_such_struct"):
        btf.offsetof("no_such_struct", "x")
    with pytest.raises(KeyError):  # BtfLookupError is a KeyError too
        btf.sizeof("struct no_such_struct")
    assert not btf.has_member("no_such_struct", "x")
    assert not btf.has_type("no_such_struct")


def test_missing_member_message_names_struct_and_member(btf):
    with pytest.raises(BtfLookupError) as ei:
        btf.offsetof("sock", "sk_receive_queue.no_such_member")
    msg = str(ei.value)
    assert "no_such_member" in msg and "sk_buff_head" in msg and "sock" in msg
    assert not msg.startswith("'")  # not KeyError's quoted repr
    assert not btf.has_member("sock", "sk_no_such")
    assert not btf.has_member("sock", "sk_rcvbuf.deeper")  # int has no members
    assert not btf.has_member("sock", "sk_socket.sk")  # no member access through pointers


def test_forward_declared_only():
    b = Builder()
    b.simple(B.KIND_FWD, name="opaque")
    with pytest.raises(BtfLookupError, match="forward"):
        Btf.from_bytes(b.build()).sizeof("struct opaque")


def test_errors_are_environment_problems(btf):
    with pytest.raises(EnvironmentProblem):
        btf.offsetof("sock", "nope")
    assert issubclass(BtfLookupError, BtfError) and issubclass(BtfFormatError, BtfError)


def test_wrong_kind_and_bad_paths(btf):
    with pytest.raises(BtfLookupError):
        btf.offsetof("u32", "x")
    with pytest.raises(BtfLookupError):
        btf.enum_values("sock")
    with pytest.raises(BtfLookupError):
        btf.offsetof("sock", "")
    with pytest.raises(BtfLookupError):
        btf.offsetof("sock", "sk_rcvbuf[0]")
    with pytest.raises(BtfLookupError, match="out of bounds"):
        btf.offsetof("sock", "sk_policy[2]")
    with pytest.raises(BtfLookupError):
        btf.offsetof("sock", "sk-rcvbuf")


def test_load_missing_file(tmp_path):
    with pytest.raises(BtfUnavailable) as ei:
        Btf.load(str(tmp_path / "nope"))
    assert isinstance(ei.value, NoBTF) and isinstance(ei.value, BtfError)


# ---------------------------------------------------------------------- malformed blobs

def test_bad_magic():
    with pytest.raises(BtfFormatError, match="magic"):
        Btf.from_bytes(b"\x00\x00" + BLOB[2:])


def test_bad_version():
    with pytest.raises(BtfFormatError, match="version"):
        Btf.from_bytes(BLOB[:2] + b"\x02" + BLOB[3:])


def test_empty_and_garbage():
    for data in (b"", b"\x9f\xeb", b"garbage" * 10, bytes(200)):
        with pytest.raises(BtfFormatError):
            Btf.from_bytes(data)


def test_every_truncation_is_a_btf_error():
    for n in range(len(BLOB)):
        with pytest.raises(BtfFormatError):
            Btf.from_bytes(BLOB[:n])


def test_unknown_kind():
    b = Builder()
    b.add(25, "future")
    with pytest.raises(BtfFormatError, match="unknown kind"):
        Btf.from_bytes(b.build())


def test_out_of_range_type_and_string():
    b = Builder()
    b.composite("s", 4, [("x", 99, 0)])
    with pytest.raises(BtfFormatError, match="type id 99"):
        Btf.from_bytes(b.build()).offsetof("s", "x")
    b = Builder()
    b.add(B.KIND_STRUCT, "s", 1, 0, 4, struct.pack("<III", 10_000, 0, 0))
    with pytest.raises(BtfFormatError, match="string offset"):
        Btf.from_bytes(b.build()).offsetof("s", "x")


def test_cycles_are_format_errors():
    b = Builder()
    b.simple(B.KIND_TYPEDEF, 2, "a")   # 1 -> 2
    b.simple(B.KIND_TYPEDEF, 1, "b")   # 2 -> 1
    with pytest.raises(BtfFormatError):
        Btf.from_bytes(b.build()).sizeof("a")
    b = Builder()
    b.composite("loop", 8, [("", 1, 0), ("", 1, 0), ("", 1, 0)])  # contains itself, anonymously
    with pytest.raises(BtfFormatError):
        Btf.from_bytes(b.build()).offsetof("loop", "x")


def _exercise(blob: bytes) -> None:
    """Parse and run every kind of query; only BtfError may come out."""
    try:
        b = Btf.from_bytes(blob)
    except BtfError:
        return
    for f in EXPECTED["fields"][::3]:
        for call in (b.offsetof, b.member_size, b.has_member):
            try:
                call(f["struct"], f["path"])
            except BtfError:
                pass
    for call in (lambda: b.enum_values("skb_drop_reason"), lambda: b.sizeof("struct tcp_sock"),
                 lambda: b.enumerator("TCP_LISTEN"), lambda: kernel_offsets(b),
                 lambda: drop_reasons(b)):
        try:
            call()
        except BtfError:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(BLOB) - 1), st.integers(0, 255)), min_size=1,
                max_size=8))
def test_corrupted_blob_raises_only_btf_error(edits):
    blob = bytearray(BLOB)
    for i, v in edits:
        blob[i] = v
    _exercise(bytes(blob))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(BLOB)), st.binary(max_size=64))
def test_truncated_or_extended_blob_raises_only_btf_error(n, tail):
    _exercise(BLOB[:n] + tail)


# ---------------------------------------------------------------------- what clang 14 doesn't emit

def test_old_style_bitfield_without_kind_flag():
    b = Builder()
    u32 = b.int_("unsigned int", 4)
    bf3 = b.int_("unsigned int", 4, bits=3)
    bf8 = b.int_("unsigned int", 4, bits=8)
    b.composite("s", 8, [("a", u32, 0), ("b", bf3, 32), ("c", bf8, 40)], kflag=0)
    btf = Btf.from_bytes(b.build())
    assert btf.offsetof("s", "a") == 0
    m = btf.member("s", "b")
    assert (m.bit_offset, m.bitfield_size) == (32, 3)
    with pytest.raises(BtfBitfieldError):
        btf.offsetof("s", "b")
    assert btf.offsetof("s", "c") == 5 and btf.member_size("s", "c") == 1


def test_signed_enum_and_enum64():
    b = Builder()
    b.enum("sgn", {"M1": -1, "MIN": -(1 << 31), "P": 7}, signed=True)
    b.enum("uns", {"BIG": 0xFFFF0000, "ZERO": 0})
    b.enum64("e64", {"HUGE": 1 << 40, "TOP": (1 << 64) - 1})
    b.enum64("s64", {"NEG": -5, "POS": 1 << 62}, signed=True)
    btf = Btf.from_bytes(b.build())
    assert btf.enum_values("sgn") == {"M1": -1, "MIN": -(1 << 31), "P": 7}
    assert btf.enum_values("uns") == {"BIG": 0xFFFF0000, "ZERO": 0}
    assert btf.enum_values("enum e64") == {"HUGE": 1 << 40, "TOP": (1 << 64) - 1}
    assert btf.enum_values("s64") == {"NEG": -5, "POS": 1 << 62}
    assert btf.sizeof("enum e64") == 8
    assert btf.enumerator("HUGE") == 1 << 40


def _every_kind(b: Builder) -> int:
    """One of each kind, then a struct using some of them; returns the struct's id."""
    i32 = b.int_("int", 4, signed=True)
    u64 = b.int_("long unsigned int", 8)
    p = b.ptr(i32)
    arr = b.array(i32, i32, 3)
    b.enum("e", {"A": 1})
    b.simple(B.KIND_FWD, name="fwd")
    td = b.simple(B.KIND_TYPEDEF, i32, "myint")
    vol = b.simple(B.KIND_VOLATILE, td)
    cst = b.simple(B.KIND_CONST, vol)
    rst = b.simple(B.KIND_RESTRICT, p)
    proto = b.add(B.KIND_FUNC_PROTO, "", 2, 0, i32, struct.pack(b.e + "IIII", b.s("x"), i32, 0, p))
    b.simple(B.KIND_FUNC, proto, "f")
    var = b.add(B.KIND_VAR, "v", 0, 0, i32, struct.pack(b.e + "I", 1))
    b.add(B.KIND_DATASEC, ".data", 1, 0, 4, struct.pack(b.e + "III", var, 0, 4))
    flt = b.add(B.KIND_FLOAT, "double", st_=8)
    b.add(B.KIND_DECL_TAG, "tag", 0, 0, var, struct.pack(b.e + "i", -1))
    tt = b.simple(B.KIND_TYPE_TAG, p, "user")
    b.enum64("e64", {"X": 1})
    return b.composite("after", 64, [("c", cst, 0), ("arr", arr, 32), ("r", rst, 128),
                                     ("t", tt, 192), ("d", flt, 256), ("u", u64, 320)])


@pytest.mark.parametrize("endian", ["<", ">"])
def test_every_kind_is_skipped(endian):
    b = Builder(endian)
    sid = _every_kind(b)
    btf = Btf.from_bytes(b.build())
    assert btf.type_count == sid
    assert btf.type_id("struct after") == sid
    assert [btf.offsetof("after", m) for m in ("c", "arr", "arr[2]", "r", "t", "d", "u")] == \
        [0, 4, 12, 16, 24, 32, 40]
    assert btf.member_size("after", "c") == 4 and btf.member_size("after", "arr") == 12
    assert btf.member_size("after", "t") == 8
    assert btf.member("after", "c").type_name == "const volatile myint"
    assert btf.sizeof("myint") == 4 and btf.sizeof("double") == 8
    assert btf.enum_values("e64") == {"X": 1}


def test_longer_header_is_accepted():
    b = Builder()
    sid = _every_kind(b)
    btf = Btf.from_bytes(b.build(hdr_extra=bytes(8)))
    assert btf.hdr_len == 32 and btf.type_id("after") == sid
