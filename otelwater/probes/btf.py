"""Read struct layouts and enum values from the running kernel's BTF.

Why this exists: the kernel probe reads ``struct sock`` and friends with
``bpf_probe_read_kernel`` at fixed byte offsets, and the installed kernel headers (Debian 6.1)
describe the WRONG layout for the running kernel (6.18): see docs/kernel.md. The only
trustworthy source is the kernel's own type information, ``/sys/kernel/btf/vmlinux``. This
module parses that file and hands the offsets to the probe as C macros (``kernel_offsets``).

Why by hand: no maintained PyPI library parses BTF (BCC and libbpf do, but only through C and
root-only program loading; there is nothing pure-Python on PyPI that is kept up to date with
the format). The format is small and stable (``Documentation/bpf/btf.rst`` in the kernel tree),
so this is a self-contained reader on the standard library's ``struct`` alone: no bcc, no root,
no compiler; any BTF blob (a file, or the ``.BTF`` section of a clang ``-g -target bpf`` object)
parses the same way.

Format in brief. A header (magic 0xEB9F, version, flags, hdr_len, type_off/len, str_off/len;
offsets are relative to the end of the header, ``hdr_len`` may grow in future versions and extra
header fields are ignored) is followed by the type section and the string section. Types are
numbered from 1 (0 is ``void``) in the order they appear; each is a 12-byte ``btf_type``
(name_off, info = vlen | kind << 24 | kind_flag << 31, size-or-type) followed by kind-specific
data. Every kind up to ENUM64 (19) is known well enough to be skipped; an unknown kind is a
``BtfFormatError`` because its length cannot be known. Both byte orders are accepted (the magic
tells which).

Speed. ``from_bytes`` makes one pass over the type section that records where each type starts
and, for named structs/unions/enums/typedefs/ints/floats/forward declarations, a map from
name *offset* to type ids; no string is decoded in that pass. A name lookup finds the name's
offset(s) in the string section with ``bytes.find`` and decodes members only of the types
asked about. Parsing the ~5.5 MB vmlinux BTF of the 6.18 kernel takes ~0.1 s.

Lookups.
- Type names: ``"sock"``, ``"struct sock"``, ``"union bpf_attr"``, ``"enum skb_drop_reason"``,
  a typedef (``"possible_net_t"``, ``"u32"``) or a base type (``"unsigned int"``). A bare name
  prefers struct, then union, then typedef, enum, int, float. Several complete definitions of one
  name exist in vmlinux BTF for a few file-local structs; the first (lowest type id) that has
  the asked member wins.
- Member paths are dotted: ``"sk_receive_queue.qlen"``, ``"__sk_common.skc_family"``. Members
  of anonymous structs/unions (the 6.18 ``struct sock`` and ``struct tcp_sock`` nest many fields
  in them) are found by their own name, as in C. Typedefs, ``const``, ``volatile``, ``restrict``
  and type tags are looked through. A component may index an array, ``"fd_array[3]"``.
- Bitfields: the probe never reads bitfields, so ``offsetof`` on a bitfield raises
  ``BtfBitfieldError``, **except** when the bitfield starts on a byte boundary and is a whole
  number of bytes wide (e.g. ``unsigned int sk_protocol:8`` in kernels before 5.6): reading
  ``member_size`` bytes at ``offsetof`` then gives its exact value on a little-endian machine,
  so it is allowed. ``member()`` describes any member, bitfield or not, without raising.
- A missing type or member raises ``BtfLookupError`` (a ``KeyError`` too) naming what is
  missing and where; ``has_member`` turns that into ``False`` for feature detection.

All errors derive from ``BtfError``, an ``EnvironmentProblem`` (exit code 3): a kernel whose
BTF lacks what the probe needs cannot run the probe.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from otelwater.errors import EnvironmentProblem, NoBTF

__all__ = [
    "BTF_MAGIC",
    "Btf",
    "BtfBitfieldError",
    "BtfError",
    "BtfFormatError",
    "BtfLookupError",
    "BtfUnavailable",
    "Member",
    "VMLINUX_BTF",
    "drop_reasons",
    "kernel_offsets",
]

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# Kinds (include/uapi/linux/btf.h).
KIND_UNKN = 0
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

KIND_NAMES = (
    "UNKN", "INT", "PTR", "ARRAY", "STRUCT", "UNION", "ENUM", "FWD", "TYPEDEF", "VOLATILE",
    "CONST", "RESTRICT", "FUNC", "FUNC_PROTO", "VAR", "DATASEC", "FLOAT", "DECL_TAG",
    "TYPE_TAG", "ENUM64",
)

# Bytes that follow the 12-byte btf_type: a fixed part, plus vlen times a per-entry part.
_FIXED = (0, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 4, 0, 0)
_PER_VLEN = (0, 0, 0, 0, 12, 12, 8, 0, 0, 0, 0, 0, 0, 8, 0, 12, 0, 0, 0, 12)

# Kinds that only qualify another type: looked through when resolving a member's type.
_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
_COMPOSITE = frozenset({KIND_STRUCT, KIND_UNION})
# Kinds indexed by name (the only ones a name lookup can ask for).
_NAMED = frozenset({KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD, KIND_TYPEDEF,
                    KIND_FLOAT, KIND_ENUM64})

_HEADER_MIN = 24
_MAX_DEPTH = 64  # modifier chains / nesting deeper than this mean a corrupt (cyclic) blob


class BtfError(EnvironmentProblem):
    """Anything wrong with BTF: unreadable, malformed, or lacking a type or member."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.one_line()


class BtfUnavailable(BtfError, NoBTF):
    """The BTF file does not exist or cannot be read."""


class BtfFormatError(BtfError):
    """The blob is not valid BTF (bad magic, truncated, out-of-range ids or offsets)."""


class BtfLookupError(BtfError, KeyError):
    """A type, member or enumerator is not in this BTF."""


class BtfBitfieldError(BtfError):
    """The member is a bitfield that cannot be read as whole bytes."""


@dataclass(frozen=True)
class Member:
    """Where a (possibly nested) member lies in its outermost struct."""

    path: str
    bit_offset: int        # from the start of the outermost struct
    bitfield_size: int     # 0 when not a bitfield
    type_id: int           # the member's declared type (before looking through typedefs)
    type_name: str         # C spelling of the declared type, e.g. "atomic_t", "struct net *"
    size: int              # bytes of the declared type (bitfield: of its storage type); -1 if unsized

    @property
    def is_bitfield(self) -> bool:
        return self.bitfield_size != 0

    @property
    def byte_readable(self) -> bool:
        """Whole bytes at a byte offset: readable with one plain load."""
        if not self.is_bitfield:
            return self.bit_offset % 8 == 0
        return self.bit_offset % 8 == 0 and self.bitfield_size % 8 == 0

    @property
    def offset(self) -> int:
        return self.bit_offset // 8

    @property
    def read_size(self) -> int:
        return self.bitfield_size // 8 if self.is_bitfield else self.size


_COMPONENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
_INDEX = re.compile(r"\[(\d+)\]")


class Btf:
    """A parsed BTF blob. Build with ``Btf.load(path)`` or ``Btf.from_bytes(data)``."""

    def __init__(self, data: bytes, *, source: str = "<bytes>"):
        self.source = source
        self._data = bytes(data)
        self._parse()
        self._enumerators: dict[str, int] | None = None
        self._name_cache: dict[str, list[int]] = {}
        self._ptr_size: int | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, path: str = VMLINUX_BTF) -> "Btf":
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BtfUnavailable(
                f"cannot read BTF from {path}: {e.strerror or e}",
                "the kernel needs CONFIG_DEBUG_INFO_BTF=y (it provides /sys/kernel/btf/vmlinux)",
            ) from e
        return cls(data, source=path)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "Btf":
        return cls(data, source=source)

    def _bad(self, what: str) -> BtfFormatError:
        return BtfFormatError(f"malformed BTF in {self.source}: {what}")

    def _parse(self) -> None:
        data = self._data
        if len(data) < _HEADER_MIN:
            raise self._bad(f"{len(data)} bytes is shorter than the {_HEADER_MIN}-byte header")
        (magic,) = struct.unpack_from("<H", data, 0)
        if magic == BTF_MAGIC:
            e = "<"
        elif magic == 0x9FEB:
            e = ">"
        else:
            raise self._bad(f"bad magic 0x{magic:04x} (expected 0x{BTF_MAGIC:04x})")
        self._e = e
        _, version, flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            e + "HBBIIIII", data, 0)
        if version != 1:
            raise self._bad(f"unsupported version {version}")
        if hdr_len < _HEADER_MIN or hdr_len > len(data):
            raise self._bad(f"header length {hdr_len} out of range")
        self.version, self.flags, self.hdr_len = version, flags, hdr_len
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(data):
            raise self._bad(f"type section [{t0}, {t0 + type_len}) runs past {len(data)} bytes")
        if s0 + str_len > len(data):
            raise self._bad(f"string section [{s0}, {s0 + str_len}) runs past {len(data)} bytes")
        if str_len == 0 or data[s0] != 0 or data[s0 + str_len - 1] != 0:
            raise self._bad("string section must start and end with a NUL byte")
        self._t0, self._tend = t0, t0 + type_len
        self._s0, self._slen = s0, str_len
        self._strings = data[s0:s0 + str_len]

        # One pass: where each type starts; named types by name offset.
        hdr = struct.Struct(e + "III").unpack_from
        fixed, per_vlen, named = _FIXED, _PER_VLEN, _NAMED
        starts = [0]  # type id 0 is void
        by_name: dict[int, list[int]] = {}
        pos, end = t0, t0 + type_len
        tid = 0
        while pos < end:
            if pos + 12 > end:
                raise self._bad(f"type {tid + 1} at offset {pos - t0} is truncated")
            name_off, info, _ = hdr(data, pos)
            kind = (info >> 24) & 0x1F
            if kind > KIND_ENUM64 or kind == KIND_UNKN:
                raise self._bad(f"type {tid + 1} has unknown kind {kind}")
            tid += 1
            starts.append(pos)
            pos += 12 + fixed[kind] + (info & 0xFFFF) * per_vlen[kind]
            if name_off and kind in named:
                lst = by_name.get(name_off)
                if lst is None:
                    by_name[name_off] = [tid]
                else:
                    lst.append(tid)
        if pos != end:
            raise self._bad(f"last type runs {pos - end} bytes past the type section")
        self._starts = starts
        self._by_name_off = by_name
        self._hdr = hdr
        self._u32x2 = struct.Struct(e + "II").unpack_from
        self._enum32 = struct.Struct(e + "Ii").unpack_from
        self._u32 = struct.Struct(e + "I").unpack_from

    # ------------------------------------------------------------------ raw access

    @property
    def type_count(self) -> int:
        """Number of types, not counting void (id 0)."""
        return len(self._starts) - 1

    def _type(self, tid: int) -> tuple[int, int, int, int, int, int]:
        """(kind, kind_flag, vlen, name_off, size_or_type, data_offset) of type ``tid``."""
        if not 0 < tid < len(self._starts):
            raise self._bad(f"type id {tid} out of range 1..{len(self._starts) - 1}")
        pos = self._starts[tid]
        name_off, info, st = self._hdr(self._data, pos)
        return (info >> 24) & 0x1F, info >> 31, info & 0xFFFF, name_off, st, pos + 12

    def _str(self, off: int) -> str:
        if not 0 <= off < self._slen:
            raise self._bad(f"string offset {off} outside the {self._slen}-byte string section")
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("utf-8", "replace")

    def kind(self, tid: int) -> str:
        return KIND_NAMES[self._type(tid)[0]]

    def name(self, tid: int) -> str:
        """The type's own name ('' when anonymous; 'void' for id 0)."""
        if tid == 0:
            return "void"
        return self._str(self._type(tid)[3])

    # ------------------------------------------------------------------ names

    def _ids_named(self, name: str) -> list[int]:
        ids = self._name_cache.get(name)
        if ids is not None:
            return ids
        ids = []
        raw = b"\0" + name.encode() + b"\0"
        strings, start = self._strings, 0
        while True:
            i = strings.find(raw, start)
            if i < 0:
                break
            ids.extend(self._by_name_off.get(i + 1, ()))
            start = i + 1
        ids.sort()
        self._name_cache[name] = ids
        return ids

    def find_types(self, type_name: str) -> list[int]:
        """Type ids for a C type name, best candidates first (see the module docstring)."""
        name = " ".join(type_name.split())
        for prefix, kinds in (("struct ", (KIND_STRUCT,)), ("union ", (KIND_UNION,)),
                              ("enum ", (KIND_ENUM, KIND_ENUM64))):
            if name.startswith(prefix):
                want, name = kinds, name[len(prefix):]
                break
        else:
            want = (KIND_STRUCT, KIND_UNION, KIND_TYPEDEF, KIND_ENUM, KIND_ENUM64, KIND_INT,
                    KIND_FLOAT)
        ids = self._ids_named(name)
        found: list[int] = []
        for k in want:
            found.extend(t for t in ids if self._type(t)[0] == k)
        if not found:
            fwd = [t for t in ids if self._type(t)[0] == KIND_FWD]
            if fwd:
                raise BtfLookupError(f"{type_name!r} is only declared (forward), not defined "
                                     f"in {self.source}")
            raise BtfLookupError(f"no type {type_name!r} in {self.source}")
        return found

    def type_id(self, type_name: str) -> int:
        return self.find_types(type_name)[0]

    def _composites(self, struct_name: str) -> list[int]:
        ids = []
        for t in self.find_types(struct_name):
            r = self.resolve(t)
            if self._type(r)[0] in _COMPOSITE:
                ids.append(r)
        if not ids:
            raise BtfLookupError(f"{struct_name!r} is not a struct or union in {self.source}")
        return ids

    # ------------------------------------------------------------------ type algebra

    def resolve(self, tid: int) -> int:
        """Look through typedef/const/volatile/restrict/type_tag to the underlying type."""
        for _ in range(_MAX_DEPTH):
            if tid == 0:
                return 0
            kind, _, _, _, st, _ = self._type(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = st
        raise self._bad(f"modifier chain deeper than {_MAX_DEPTH} (a cycle?)")

    def _pointer_size(self) -> int:
        """BTF does not record pointer width; take it from ``unsigned long`` (LP64 and ILP32
        alike), 8 when the blob has no such type."""
        if self._ptr_size is None:
            self._ptr_size = 8
            for t in self._ids_named("long unsigned int"):
                kind, _, _, _, size, _ = self._type(t)
                if kind == KIND_INT and size in (4, 8):
                    self._ptr_size = size
                    break
        return self._ptr_size

    def type_size(self, tid: int, _depth: int = 0) -> int:
        """Size in bytes of type ``tid``; ``BtfLookupError`` for unsized types."""
        if _depth > _MAX_DEPTH:
            raise self._bad(f"type nesting deeper than {_MAX_DEPTH} (a cycle?)")
        tid = self.resolve(tid)
        if tid == 0:
            raise BtfLookupError("void has no size")
        kind, _, _, _, st, d = self._type(tid)
        if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT,
                    KIND_DATASEC):
            return st
        if kind == KIND_PTR:
            return self._pointer_size()
        if kind == KIND_ARRAY:
            elem, _ = self._u32x2(self._data, d)
            (nelems,) = self._u32(self._data, d + 8)
            return nelems * self.type_size(elem, _depth + 1) if nelems else 0
        raise BtfLookupError(f"type {self.type_str(tid)!r} ({KIND_NAMES[kind]}) has no size")

    def type_str(self, tid: int, _depth: int = 0) -> str:
        """A C-like spelling of a type, for messages and reports."""
        if tid == 0:
            return "void"
        if _depth > _MAX_DEPTH:
            return "..."
        kind, _, _, name_off, st, d = self._type(tid)
        name = self._str(name_off)
        if kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FWD):
            tag = {KIND_STRUCT: "struct", KIND_UNION: "union", KIND_FWD: "struct"}.get(kind, "enum")
            return f"{tag} {name or '(anon)'}"
        if kind in (KIND_INT, KIND_TYPEDEF, KIND_FLOAT, KIND_FUNC, KIND_VAR):
            return name
        if kind == KIND_PTR:
            return self.type_str(st, _depth + 1) + " *"
        if kind in (KIND_CONST, KIND_VOLATILE, KIND_RESTRICT):
            return f"{KIND_NAMES[kind].lower()} {self.type_str(st, _depth + 1)}"
        if kind == KIND_TYPE_TAG:
            return self.type_str(st, _depth + 1)
        if kind == KIND_ARRAY:
            elem, _ = self._u32x2(self._data, d)
            (n,) = self._u32(self._data, d + 8)
            return f"{self.type_str(elem, _depth + 1)}[{n}]"
        if kind == KIND_FUNC_PROTO:
            return "(function)"
        return f"({KIND_NAMES[kind]})"

    def members(self, tid: int) -> list[tuple[str, int, int, int]]:
        """Direct members of struct/union ``tid``: (name, type_id, bit_offset, bitfield_size)."""
        kind, kflag, vlen, _, _, d = self._type(tid)
        if kind not in _COMPOSITE:
            raise BtfLookupError(f"{self.type_str(tid)!r} is not a struct or union")
        out = []
        data, hdr = self._data, self._hdr
        for i in range(vlen):
            name_off, mtype, off = hdr(data, d + 12 * i)
            if kflag:
                bit_off, bsize = off & 0xFFFFFF, off >> 24
            else:
                bit_off, bsize = off, 0
                # Old encoding: a bitfield is an INT whose nr_bits is narrower than its size.
                r = self.resolve(mtype)
                if r:
                    rk, _, _, _, rsize, rd = self._type(r)
                    if rk == KIND_INT:
                        (enc,) = self._u32(data, rd)
                        nr_bits, int_off = enc & 0xFF, (enc >> 16) & 0xFF
                        if nr_bits != rsize * 8 or int_off:
                            bit_off, bsize = off + int_off, nr_bits
            out.append((self._str(name_off), mtype, bit_off, bsize))
        return out

    def _find_member(self, tid: int, name: str, _outer: tuple[int, ...] = ()):
        """(type_id, bit_offset, bitfield_size) of member ``name`` of composite ``tid``,
        looking through anonymous struct/union members; None when absent."""
        if tid in _outer or len(_outer) > _MAX_DEPTH:
            raise self._bad(f"{self.type_str(tid)!r} contains itself (a cycle)")
        outer = _outer + (tid,)
        for mname, mtype, bit_off, bsize in self.members(tid):
            if mname == name:
                return mtype, bit_off, bsize
            if not mname:
                r = self.resolve(mtype)
                if r and self._type(r)[0] in _COMPOSITE:
                    hit = self._find_member(r, name, outer)
                    if hit is not None:
                        return hit[0], bit_off + hit[1], hit[2]
        return None

    def _walk(self, tid: int, struct_name: str, path: str) -> Member:
        if not path:
            raise BtfLookupError(f"empty member path for {struct_name!r}")
        bit = 0
        bsize = 0
        mtype = tid
        cur = tid
        done: list[str] = []
        for comp in path.split("."):
            m = _COMPONENT.match(comp)
            if not m:
                raise BtfLookupError(f"bad member path component {comp!r} in {path!r}")
            mname, idx = m.group(1), m.group(2)
            if bsize:
                raise BtfLookupError(f"{'.'.join(done)} is a bitfield: it has no member {mname!r}")
            r = self.resolve(cur)
            if r == 0 or self._type(r)[0] not in _COMPOSITE:
                raise BtfLookupError(f"{struct_name}.{'.'.join(done)} is {self.type_str(cur)!r},"
                                     f" not a struct or union: no member {mname!r}")
            hit = self._find_member(r, mname)
            if hit is None:
                via = f" (at {struct_name}.{'.'.join(done)})" if done else ""
                raise BtfLookupError(
                    f"{self.type_str(r)}{via} has no member {mname!r} in {self.source}")
            mtype, off, bsize = hit
            bit += off
            for i in _INDEX.findall(idx):
                ar = self.resolve(mtype)
                if ar == 0 or self._type(ar)[0] != KIND_ARRAY:
                    raise BtfLookupError(f"{mname} is {self.type_str(mtype)!r}, not an array")
                elem, _ = self._u32x2(self._data, self._type(ar)[5])
                (n,) = self._u32(self._data, self._type(ar)[5] + 8)
                if int(i) >= n and n:
                    raise BtfLookupError(f"{mname}[{i}] out of bounds: {mname} has {n} elements")
                bit += int(i) * self.type_size(elem) * 8
                mtype = elem
            done.append(comp)
            cur = mtype
        try:
            size = self.type_size(mtype)
        except BtfLookupError:
            size = -1
        return Member(path, bit, bsize, mtype, self.type_str(mtype), size)

    # ------------------------------------------------------------------ public queries

    def member(self, struct_name: str, path: str) -> Member:
        """Describe ``struct_name.path`` (bitfields included, never refused)."""
        candidates = self._composites(struct_name)
        first_err: BtfLookupError | None = None
        for tid in candidates:
            try:
                return self._walk(tid, struct_name, path)
            except BtfLookupError as e:
                first_err = first_err or e
        assert first_err is not None
        raise first_err

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` (dotted) inside ``struct_name``."""
        m = self.member(struct_name, path)
        if not m.byte_readable:
            raise BtfBitfieldError(
                f"{struct_name}.{path} is a bitfield ({m.bitfield_size} bits at bit "
                f"{m.bit_offset}) that is not whole bytes at a byte offset; the probe does not "
                f"read such bitfields")
        return m.offset

    def member_size(self, struct_name: str, path: str) -> int:
        """Bytes to read for ``path``: its type's size, or a whole-byte bitfield's width."""
        m = self.member(struct_name, path)
        if not m.byte_readable:
            raise BtfBitfieldError(f"{struct_name}.{path} is a bitfield that is not whole bytes")
        if m.read_size < 0:
            raise BtfLookupError(f"{struct_name}.{path} has unsized type {m.type_name!r}")
        return m.read_size

    def has_member(self, struct_name: str, path: str) -> bool:
        try:
            self.member(struct_name, path)
        except BtfLookupError:
            return False
        return True

    def has_type(self, type_name: str) -> bool:
        try:
            self.find_types(type_name)
        except BtfLookupError:
            return False
        return True

    def sizeof(self, type_name: str) -> int:
        return self.type_size(self.type_id(type_name))

    def func_id(self, name: str) -> int:
        """The type id of the function (FUNC) ``name``: a kfunc's id is what a BPF program
        calls it by. Functions are not indexed by name: one scan of the types that carry
        the name's string (~0.05 s on vmlinux), for the few kfuncs the probes use."""
        raw = b"\0" + name.encode() + b"\0"
        offs, start = set(), 0
        while True:
            i = self._strings.find(raw, start)
            if i < 0:
                break
            offs.add(i + 1)
            start = i + 1
        if offs:
            hdr, data, starts = self._hdr, self._data, self._starts
            for tid in range(1, len(starts)):
                name_off, info, _ = hdr(data, starts[tid])
                if name_off in offs and (info >> 24) & 0x1F == KIND_FUNC:
                    return tid
        raise BtfLookupError(f"no function {name!r} in {self.source}")

    def enum_values(self, enum_name: str) -> dict[str, int]:
        """Enumerator name -> value for a named enum (ENUM or ENUM64, or a typedef of one), in
        declaration order. Signedness follows the BTF spec: kind_flag set means signed, clear
        means unsigned (so a kind_flag=0 enumerator -1, as clang 14 emits, reads 0xffffffff;
        bpftool reads it the same way)."""
        if enum_name.startswith("enum ") or self.has_type("enum " + enum_name):
            name = enum_name if enum_name.startswith("enum ") else "enum " + enum_name
            return self._enum_members(self.find_types(name)[0])
        tid = self.resolve(self.type_id(enum_name))  # a typedef of an enum
        if tid == 0 or self._type(tid)[0] not in (KIND_ENUM, KIND_ENUM64):
            raise BtfLookupError(f"{enum_name!r} is not an enum in {self.source}")
        return self._enum_members(tid)

    def _enum_members(self, tid: int) -> dict[str, int]:
        kind, signed, vlen, _, _, d = self._type(tid)
        data, out = self._data, {}
        if kind == KIND_ENUM:
            for i in range(vlen):
                name_off, val = self._enum32(data, d + 8 * i)
                if not signed and val < 0:
                    val += 1 << 32
                out[self._str(name_off)] = val
        elif kind == KIND_ENUM64:
            for i in range(vlen):
                name_off, lo, hi = self._hdr(data, d + 12 * i)
                val = (hi << 32) | lo
                if signed and val >= 1 << 63:
                    val -= 1 << 64
                out[self._str(name_off)] = val
        else:
            raise BtfLookupError(f"{self.type_str(tid)!r} is not an enum")
        return out

    def enumerator(self, name: str) -> int:
        """Value of an enumerator by its own name, in any enum, named or anonymous
        (the TCP states, ``TCP_ESTABLISHED`` ..., are in an anonymous enum)."""
        if self._enumerators is None:
            table: dict[str, int] = {}
            for tid in range(1, len(self._starts)):
                if self._type(tid)[0] in (KIND_ENUM, KIND_ENUM64):
                    for k, v in self._enum_members(tid).items():
                        table.setdefault(k, v)
            self._enumerators = table
        try:
            return self._enumerators[name]
        except KeyError:
            raise BtfLookupError(f"no enumerator {name!r} in {self.source}") from None


# ---------------------------------------------------------------------- what the probe needs

# Macro name -> (struct, member path). Everything the kernel probe reads.
KERNEL_FIELDS: dict[str, tuple[str, str]] = {
    "OFF_SKC_FAMILY": ("sock", "__sk_common.skc_family"),
    "OFF_SKC_NUM": ("sock", "__sk_common.skc_num"),
    "OFF_SKC_DPORT": ("sock", "__sk_common.skc_dport"),
    "OFF_SKC_DADDR": ("sock", "__sk_common.skc_daddr"),
    "OFF_SKC_RCV_SADDR": ("sock", "__sk_common.skc_rcv_saddr"),
    "OFF_SKC_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "OFF_SKC_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr"),
    # possible_net_t's first (only) member is `struct net *net`: read a pointer here.
    "OFF_SKC_NET": ("sock", "__sk_common.skc_net.net"),
    "OFF_SKC_STATE": ("sock", "__sk_common.skc_state"),
    "OFF_NET_NS_INUM": ("net", "ns.inum"),
    "OFF_SK_RCVQ_QLEN": ("sock", "sk_receive_queue.qlen"),
    # The kernel's sk_rmem_alloc macro is sk_backlog.rmem_alloc.
    "OFF_SK_RMEM_ALLOC": ("sock", "sk_backlog.rmem_alloc"),
    "OFF_SK_BACKLOG_LEN": ("sock", "sk_backlog.len"),
    "OFF_SK_RCVBUF": ("sock", "sk_rcvbuf"),
    "OFF_SK_DROPS": ("sock", "sk_drops"),
    "OFF_SK_PROTOCOL": ("sock", "sk_protocol"),
    "OFF_SK_SOCKET": ("sock", "sk_socket"),
    # bit SOCK_DONE (enum sock_flags) is set when the peer's FIN arrived: SIOCINQ then
    # leaves the FIN's sequence number out of the unread bytes, and so does otelwater
    "OFF_SK_FLAGS": ("sock", "sk_flags"),
    "OFF_TCP_RCV_NXT": ("tcp_sock", "rcv_nxt"),
    "OFF_TCP_COPIED_SEQ": ("tcp_sock", "copied_seq"),
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDT_FD": ("fdtable", "fd"),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FILE_PRIVATE_DATA": ("file", "private_data"),
    "OFF_SOCKET_SK": ("socket", "sk"),
    "OFF_SOCKET_FILE": ("socket", "file"),
    "OFF_FILE_INODE": ("file", "f_inode"),
    "OFF_INODE_INO": ("inode", "i_ino"),
    "OFF_SOCKALLOC_INODE": ("socket_alloc", "vfs_inode"),
}

# Where a field moved between kernels: the other places to look, in order.
# sk_flags became __sk_common.skc_flags (the sk_flags macro still names it) in 6.x.
KERNEL_FIELD_MOVES: dict[str, tuple[tuple[str, str], ...]] = {
    "OFF_SK_FLAGS": (("sock", "__sk_common.skc_flags"),),
}


def kernel_field(btf: "Btf", macro: str) -> tuple[str, str]:
    """(struct, member path) of a KERNEL_FIELDS macro as this kernel lays it out: the usual
    place, else the first of KERNEL_FIELD_MOVES that exists (the usual place if none does,
    so the lookup error names it)."""
    first = KERNEL_FIELDS[macro]
    for struct_name, path in (first, *KERNEL_FIELD_MOVES.get(macro, ())):
        try:
            btf.member(struct_name, path)
            return struct_name, path
        except BtfError:
            continue
    return first


# Fields whose width has varied between kernels: the probe reads SIZE_* bytes.
# sk_drops: atomic_t (4) for years; sk_protocol: an 8-bit bitfield before 5.6, u16 since.
KERNEL_SIZES: dict[str, str] = {
    "SIZE_SK_DROPS": "OFF_SK_DROPS",
    "SIZE_SK_PROTOCOL": "OFF_SK_PROTOCOL",
}


def kernel_offsets(btf: Btf) -> dict[str, int]:
    """C macro name -> value for every offset (``OFF_*``) and varying width (``SIZE_*``) the
    kernel probe reads. Raises one ``BtfLookupError`` naming every field that is missing."""
    out: dict[str, int] = {}
    missing: list[str] = []
    members: dict[str, Member] = {}
    for macro in KERNEL_FIELDS:
        struct_name, path = kernel_field(btf, macro)
        try:
            m = btf.member(struct_name, path)
            if not m.byte_readable:
                raise BtfBitfieldError(f"{struct_name}.{path} is a bitfield not readable as bytes")
        except BtfError as e:
            missing.append(f"{macro} ({struct_name}.{path}: {e})")
            continue
        members[macro] = m
        out[macro] = m.offset
    if missing:
        raise BtfLookupError(
            f"the kernel's BTF ({btf.source}) lacks fields the probe needs: " + "; ".join(missing))
    for size_macro, off_macro in KERNEL_SIZES.items():
        out[size_macro] = members[off_macro].read_size
    return out


def drop_reasons(btf: Btf) -> dict[int, str]:
    """``enum skb_drop_reason`` value -> short name (``SKB_DROP_REASON_`` removed), e.g.
    ``{2: "NOT_SPECIFIED", 3: "NO_SOCKET", ...}``. The sentinels ``MAX`` and ``SUBSYS_MASK``
    are left out; when two names share a value the first declared wins."""
    prefix = "SKB_DROP_REASON_"
    out: dict[int, str] = {}
    for name, value in btf.enum_values("skb_drop_reason").items():
        short = name[len(prefix):] if name.startswith(prefix) else name
        if short in ("MAX", "SUBSYS_MASK"):
            continue
        out.setdefault(value, short)
    return out
