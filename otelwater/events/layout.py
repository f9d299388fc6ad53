"""ctypes types built from the BPF headers themselves (bpf/*.h), so each kernel→user layout is
defined exactly once. The headers use a deliberately small C subset: `#define NAME number`,
`struct name { TYPE field; TYPE field[N]; struct other field; };` with fixed-width types.
Written by hand (about 60 lines) because cffi would add a compiler dependency for the same
result and BCC's own ctypes types exist only after a program is loaded as root.
"""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path

# The BPF sources (headers and programs): installed from a wheel they ship inside the package
# as otelwater/bpf (pyproject.toml maps it to bpf/); in a checkout, and an editable install of
# one, they are the top-level bpf/ folder beside the package.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
BPF_DIR = _PACKAGE_DIR / "bpf"
if not BPF_DIR.is_dir():
    BPF_DIR = _PACKAGE_DIR.parent / "bpf"

_CTYPES = {
    "u8": ctypes.c_uint8, "u16": ctypes.c_uint16, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64,
    "s8": ctypes.c_int8, "s16": ctypes.c_int16, "s32": ctypes.c_int32, "s64": ctypes.c_int64,
    "char": ctypes.c_char, "int": ctypes.c_int32,
}
_STRUCT_RE = re.compile(r"struct\s+(\w+)\s*\{(.*?)\};", re.S)
_FIELD_RE = re.compile(r"^\s*(struct\s+\w+|\w+)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?"
                       r"(?:\[\s*(\w+)\s*\])?\s*;")   # up to two dimensions
_DEFINE_RE = re.compile(r"^\s*#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", re.M)


class Header:
    """The structs and numeric defines of one BPF header."""

    def __init__(self, text: str):
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        text = re.sub(r"//[^\n]*", "", text)
        self.defines = {m[1]: int(m[2], 0) for m in _DEFINE_RE.finditer(text)}
        self.structs: dict[str, type[ctypes.Structure]] = {}
        for m in _STRUCT_RE.finditer(text):
            self.structs[m[1]] = self._build(m[1], m[2])

    def _build(self, name: str, body: str) -> type[ctypes.Structure]:
        fields = []
        for line in body.split(";"):
            line = line.strip()
            if not line:
                continue
            fm = _FIELD_RE.match(line + ";")
            if not fm:
                raise ValueError(f"struct {name}: cannot parse field {line!r}")
            tname, fname = fm[1], fm[2]
            if tname.startswith("struct"):
                ctype = self.structs[tname.split()[1]]
            else:
                ctype = _CTYPES[tname]
            for count in (fm[4], fm[3]):     # a[N][M]: an array of N arrays of M
                if count:
                    n = int(count, 0) if count[0].isdigit() else self.defines[count]
                    ctype = ctype * n
            fields.append((fname, ctype))
        return type(name, (ctypes.Structure,), {"_fields_": fields})

    def defines_with_prefix(self, prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: v for k, v in self.defines.items() if k.startswith(prefix)}


@functools.cache
def header(name: str) -> Header:
    return Header((BPF_DIR / name).read_text())
