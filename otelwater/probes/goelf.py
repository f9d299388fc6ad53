"""Locate what the Go read sampler needs inside a Go x86-64 executable.

``locate(path)`` reads the ELF file with pyelftools and returns a ``GoBinaryInfo``:
  - the Go version, from ``.go.buildinfo`` (survives ``-ldflags="-s -w"``);
  - ``net.(*conn).Read``: virtual address (what BCC's ``attach_uprobe(addr=...)`` takes), file
    offset, size, and the offset of each ``ret`` in it, from a capstone disassembly that stops
    at the int3 padding (uprobes go on the ``ret`` sites: uretprobes crash Go programs).
    Symbols come from ``.symtab`` when present, else from ``.gopclntab`` (Go 1.16+ formats);
  - struct offsets (``runtime.g.goid``, ...), from DWARF when present, else from the
    per-Go-version table in ``gooffsets.py``.
``Symbolizer(path)`` maps ELF virtual addresses to Go function names (for user stacks; for a PIE
binary subtract the load bias first). Anything unusable raises ``BinaryError`` naming the fix.
"""

from __future__ import annotations

import bisect
import io
import re
import struct
from dataclasses import asdict, dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from otelwater.errors import BinaryError
from otelwater.probes import gooffsets

READ_FUNCTION = "net.(*conn).Read"
FUNCTIONS = (READ_FUNCTION,)
MIN_GO_MINOR = 17  # register ABI on amd64
BUILDINFO_MAGIC = b"\xff Go buildinf:"
PCLNTAB_MAGICS = {0xFFFFFFF1: "go1.20+", 0xFFFFFFF0: "go1.18", 0xFFFFFFFA: "go1.16", 0xFFFFFFFB: "go1.2"}
FIX_GO = "give the path of a Go program's executable (for a running process: /proc/PID/exe)"


@dataclass(frozen=True)
class FunctionInfo:
    name: str
    address: int  # ELF virtual address
    file_offset: int
    size: int  # from .symtab (exact) or .gopclntab (includes int3 padding)
    return_offsets: tuple[int, ...]  # from the function start, one per `ret`


@dataclass(frozen=True)
class GoBinaryInfo:
    path: str
    go_version: str
    stripped: bool  # no .symtab
    pie: bool  # ET_DYN
    functions: dict[str, FunctionInfo]
    offsets: dict[str, int]
    offsets_source: str  # "dwarf" or "table"

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "go_version": self.go_version,
            "stripped": self.stripped,
            "pie": self.pie,
            "functions": {
                n: {k: (list(v) if k == "return_offsets" else v) for k, v in asdict(f).items() if k != "name"}
                for n, f in self.functions.items()
            },
            "offsets": dict(self.offsets),
            "offsets_source": self.offsets_source,
        }


class _GoELF:
    """The bytes of one ELF file and the few views of it that locate and Symbolizer need."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.data = f.read()
        except OSError as e:
            raise BinaryError(f"cannot read {path}: {e.strerror}", "give the path of a readable Go executable") from None
        if self.data[:4] != b"\x7fELF":
            raise BinaryError(f"{path} is not an ELF executable", FIX_GO)
        try:
            self.elf = ELFFile(io.BytesIO(self.data))
            machine = self.elf["e_machine"]
        except ELFError as e:
            raise BinaryError(f"{path} is a damaged ELF file ({e})", FIX_GO) from None
        if machine != "EM_X86_64" or self.elf.elfclass != 64:
            raise BinaryError(
                f"{path} is built for {machine.removeprefix('EM_')}, not x86-64; otelwater traces x86-64 Go programs",
                "build it with GOARCH=amd64 and run it on an x86-64 host",
            )
        self.loads = [
            (s["p_vaddr"], s["p_offset"], s["p_filesz"]) for s in self.elf.iter_segments() if s["p_type"] == "PT_LOAD"
        ]

    def section(self, *names):
        for s in self.elf.iter_sections():
            if s.name in names:
                return s
        return None

    def file_offset(self, vaddr: int) -> int | None:
        for va, off, size in self.loads:
            if va <= vaddr < va + size:
                return vaddr - va + off
        return None

    def u(self, off: int, size: int) -> int:
        return int.from_bytes(self.data[off : off + size], "little")

    def go_version(self) -> str | None:
        sec = self.section(".go.buildinfo")
        off = sec["sh_offset"] if sec is not None else self.data.find(BUILDINFO_MAGIC)
        if off < 0 or self.data[off : off + 14] != BUILDINFO_MAGIC:
            return None
        ptr, flags = self.data[off + 14], self.data[off + 15]
        if flags & 2:  # Go 1.18+: varint-prefixed strings inline after the 32-byte header
            n, shift, p = 0, 0, off + 32
            while True:
                b = self.data[p]
                n, shift, p = n | (b & 0x7F) << shift, shift + 7, p + 1
                if b < 0x80:
                    break
            return self.data[p : p + n].decode(errors="replace")
        hdr = self.file_offset(self.u(off + 16, ptr))  # Go 1.13-1.17: pointer to a Go string header
        if hdr is None:
            return None
        s = self.file_offset(self.u(hdr, ptr))
        return None if s is None else self.data[s : s + self.u(hdr + ptr, ptr)].decode(errors="replace")

    def symbols(self) -> list[tuple[int, int, str]]:
        """Sorted (address, size, name) of functions: .symtab when present, else .gopclntab."""
        symtab = self.section(".symtab")
        if symtab is not None:
            strtab = self.elf.get_section(symtab["sh_link"]).data()
            out = []
            for name, info, _o, shndx, value, size in struct.iter_unpack("<IBBHQQ", symtab.data()):
                if info & 0xF == 2 and value:  # STT_FUNC
                    out.append((value, size, strtab[name : strtab.index(b"\0", name)].decode(errors="replace")))
            return sorted(out)
        return self.pclntab_symbols()

    def pclntab_symbols(self) -> list[tuple[int, int, str]]:
        sec = self.section(".gopclntab", ".data.rel.ro.gopclntab")
        if sec is not None:
            off = sec["sh_offset"]
        else:  # no section headers for it: find the header by its shape
            m = re.search(rb"[\xf0\xf1\xfa]\xff\xff\xff\x00\x00\x01\x08", self.data)
            if m is None:
                raise BinaryError(f"{self.path} is not a Go program (no .gopclntab)", FIX_GO)
            off = m.start()
        magic, ptr = self.u(off, 4), self.data[off + 7]
        hdr = [self.u(off + 8 + i * ptr, ptr) for i in range(8)]
        if magic in (0xFFFFFFF0, 0xFFFFFFF1):  # nfunc nfiles textStart funcname cu filetab pctab pcln
            nfunc, text, names, functab = hdr[0], hdr[2], off + hdr[3], off + hdr[7]
            if text == 0:  # relocated at load time in some PIE builds
                text = self.section(".text")["sh_addr"]
            entry = lambda i: text + self.u(functab + 8 * i, 4)  # noqa: E731
            funcoff = lambda i: self.u(functab + 8 * i + 4, 4)  # noqa: E731
            nameoff = lambda fo: struct.unpack_from("<i", self.data, functab + fo + 4)[0]  # noqa: E731
        elif magic == 0xFFFFFFFA:  # Go 1.16-1.17: nfunc nfiles funcname cu filetab pctab pcln
            nfunc, names, functab = hdr[0], off + hdr[2], off + hdr[6]
            entry = lambda i: self.u(functab + 2 * ptr * i, ptr)  # noqa: E731
            funcoff = lambda i: self.u(functab + 2 * ptr * i + ptr, ptr)  # noqa: E731
            nameoff = lambda fo: struct.unpack_from("<i", self.data, functab + fo + ptr)[0]  # noqa: E731
        elif magic in PCLNTAB_MAGICS:
            raise BinaryError(f"{self.path} was built by Go older than 1.16", "rebuild it with Go 1.17 or newer")
        else:
            raise BinaryError(f"{self.path}: unknown .gopclntab format (magic {magic:#x})", "report the Go version")
        out = []
        for i in range(nfunc):
            start, p = entry(i), names + nameoff(funcoff(i))
            out.append((start, entry(i + 1) - start, self.data[p : self.data.index(b"\0", p)].decode(errors="replace")))
        return sorted(out)

    def dwarf_offsets(self) -> dict[str, int] | None:
        """Member offsets of gooffsets.FIELDS from DWARF, or None when absent or incomplete."""
        if not self.elf.has_dwarf_info():
            return None
        want: dict[bytes, dict[bytes, str]] = {}
        for key in gooffsets.FIELDS:
            struct_name, member = key.rsplit(".", 1)
            want.setdefault(struct_name.encode(), {})[member.encode()] = key
        found: dict[str, int] = {}
        try:
            for cu in self.elf.get_dwarf_info().iter_CUs():
                for die in cu.get_top_DIE().iter_children():
                    name = die.attributes.get("DW_AT_name")
                    if die.tag != "DW_TAG_structure_type" or name is None or name.value not in want:
                        continue
                    members = want.pop(name.value)
                    for m in die.iter_children():
                        mname = m.attributes.get("DW_AT_name")
                        loc = m.attributes.get("DW_AT_data_member_location")
                        if mname is not None and mname.value in members and loc is not None:
                            found[members[mname.value]] = loc.value
                    if not want:
                        break
                if not want:
                    break
        except Exception:  # pyelftools on an unexpected DWARF form: the table is the fallback
            return None
        return {k: found[k] for k in gooffsets.FIELDS} if len(found) == len(gooffsets.FIELDS) else None


def go_minor(version: str) -> int | None:
    m = re.match(r"go1\.(\d+)", version)
    return int(m.group(1)) if m else None


def return_offsets(code: bytes, address: int) -> tuple[int, ...]:
    """Offsets of each `ret` in code, up to the first int3 (Go's padding between functions)."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    rets = []
    for addr, _size, mnemonic, _ops in Cs(CS_ARCH_X86, CS_MODE_64).disasm_lite(code, address):
        if mnemonic == "int3":
            break
        if mnemonic.startswith("ret"):
            rets.append(addr - address)
    return tuple(rets)


def locate(path: str) -> GoBinaryInfo:
    g = _GoELF(path)
    version = g.go_version()
    if version is None:
        if g.section(".gopclntab", ".data.rel.ro.gopclntab") is None:
            raise BinaryError(f"{path} is not a Go program (no .go.buildinfo or .gopclntab)", FIX_GO)
        raise BinaryError(f"{path} has no readable Go version (.go.buildinfo)", "rebuild it with Go 1.17 or newer")
    minor = go_minor(version)
    if minor is None or minor < MIN_GO_MINOR:
        raise BinaryError(
            f"{path} was built by {version}; otelwater needs Go 1.17 or newer (register ABI)",
            "rebuild the program with Go 1.17+",
        )
    syms: dict[str, tuple[int, int]] = {}
    for addr, size, name in g.symbols():  # a name twice: ABI wrapper + body; keep the body
        if name not in syms or size > syms[name][1]:
            syms[name] = (addr, size)
    functions = {}
    for name in FUNCTIONS:
        if name not in syms:
            raise BinaryError(
                f"{path} has no {name}: the program does not read TCP through package net",
                "point otelwater at a Go program that uses net.Conn",
            )
        addr, size = syms[name]
        off = g.file_offset(addr)
        if off is None:
            raise BinaryError(f"{path}: {name} at {addr:#x} lies in no loaded segment", FIX_GO)
        rets = return_offsets(g.data[off : off + size], addr)
        if not rets:
            raise BinaryError(f"{path}: no ret instruction found in {name}", "report the Go version and the binary")
        functions[name] = FunctionInfo(name, addr, off, size, rets)
    offsets, source = g.dwarf_offsets(), "dwarf"
    if offsets is None:
        offsets, source = gooffsets.offsets_for(minor), "table"
        if offsets is None:
            raise BinaryError(
                f"{path} has no DWARF and otelwater's offset table has no Go 1.{minor} ({version}); "
                f"known: {', '.join(f'1.{m}' for m in sorted(gooffsets.OFFSETS))}",
                f"build it without -w (keeps DWARF), or add Go 1.{minor} to otelwater/probes/gooffsets.py",
            )
    return GoBinaryInfo(
        path=path,
        go_version=version,
        stripped=g.section(".symtab") is None,
        pie=g.elf["e_type"] == "ET_DYN",
        functions=functions,
        offsets=dict(offsets),
        offsets_source=source,
    )


class Symbolizer:
    """ELF virtual address -> name of the Go function containing it (bisect over entries)."""

    def __init__(self, path: str):
        syms = _GoELF(path).symbols()
        self._starts = [a for a, _, _ in syms]
        self._ends = [a + s for a, s, _ in syms]
        self._names = [n for _, _, n in syms]

    def __len__(self) -> int:
        return len(self._names)

    def lookup(self, addr: int) -> str | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        return self._names[i] if i >= 0 and addr < self._ends[i] else None
