"""Locate what the Go read sampler needs inside a Go x86-64 executable.

``locate(path)`` reads the ELF file with pyelftools and returns a ``GoBinaryInfo``:
  - the Go version, from ``.go.buildinfo`` (survives ``-ldflags="-s -w"``);
  - ``net.(*conn).Read``: virtual address (what BCC's ``attach_uprobe(addr=...)`` takes), file
    offset, size, and the offset of each ``ret`` in it, from a capstone disassembly that stops
    at the int3 padding (uprobes go on the ``ret`` sites: uretprobes crash Go programs).
    Symbols come from ``.symtab`` when present, else from ``.gopclntab`` (Go 1.16+ formats),
    whose entries count from runtime.text: read from runtime.firstmoduledata (see text_base),
    so PIE, cgo/external linking and Go 1.26+ (no pcHeader.textStart) all come out right;
  - struct offsets (``runtime.g.goid``, ...), from DWARF when present, else from the
    per-Go-version table in ``gooffsets.py``.
``Symbolizer(path)`` maps ELF virtual addresses to Go function names (for user stacks; for a PIE
binary subtract the load bias first). Anything unusable raises ``BinaryError`` naming the fix.
``read_support(path)`` never raises: whether goroutine ids and stack names are to be had from a
binary, and if not, one line saying why (for the sampler to say once, not per record).
"""

from __future__ import annotations

import bisect
import io
import os
import re
import stat
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
R_X86_64_RELATIVE = 8
# runtime.moduledata (Go 1.16-1.27, unchanged): pcHeader, then 6 slices (3 words each):
# funcnametab cutab filetab pctab pclntable ftab, then findfunctab minpc maxpc text etext
MD_FTAB, MD_MINPC, MD_MAXPC, MD_TEXT = 16 * 8, 20 * 8, 21 * 8, 22 * 8
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
    # where function addresses came from: "symtab", or "gopclntab+moduledata" / "gopclntab+pcheader"
    # (the text base: runtime.firstmoduledata.text, or pcHeader.textStart before Go 1.26)
    symbols_source: str = "symtab"

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
            "symbols_source": self.symbols_source,
        }


@dataclass(frozen=True)
class ReadSupport:
    """What the Go read sampler can tell about the reads of one binary (``read_support()``)."""

    goids: bool  # runtime.g.goid's offset is known (DWARF or the per-version table)
    stacks: bool  # stack addresses map to function names (.symtab, or .gopclntab + its text base)
    reason: str | None  # one line: what is missing, why, and the fix; None when both work


class _GoELF:
    """The bytes of one ELF file and the few views of it that locate and Symbolizer need."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # /dev/zero, a fifo: never ends
                    raise BinaryError(f"{path} is not a regular file", FIX_GO)
                self.data = f.read()
        except OSError as e:
            raise BinaryError(f"cannot read {path}: {e.strerror}", "give the path of a readable Go executable") from None
        if self.data[:4] != b"\x7fELF":
            raise BinaryError(f"{path} is not an ELF executable", FIX_GO)
        # every header and every section's and segment's bytes must lie in the file (a copy cut short)
        end = 0
        if self.data[4:6] == b"\x02\x01" and len(self.data) >= 64:  # ELF64 little-endian
            phoff, shoff = struct.unpack_from("<QQ", self.data, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", self.data, 0x36)
            end = max(phoff + phnum * phentsize, shoff + shnum * shentsize)
            if end <= len(self.data) and phentsize >= 48 and shentsize >= 40:
                for i in range(phnum):  # p_type p_flags p_offset p_vaddr p_paddr p_filesz
                    _t, _f, off, _v, _p, size = struct.unpack_from("<IIQQQQ", self.data, phoff + i * phentsize)
                    end = max(end, off + size)
                for i in range(shnum):  # sh_name sh_type sh_flags sh_addr sh_offset sh_size
                    _n, typ, _f, _a, off, size = struct.unpack_from("<IIQQQQ", self.data, shoff + i * shentsize)
                    end = max(end, off + size if typ != 8 else 0)  # SHT_NOBITS has no bytes
        if end > len(self.data):
            raise BinaryError(
                f"{path} is truncated or damaged: its ELF headers describe {end} bytes, the file has {len(self.data)}",
                "copy or build the whole executable again",
            )
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
        segments = list(self.elf.iter_segments())
        self.loads = [(s["p_vaddr"], s["p_offset"], s["p_filesz"]) for s in segments if s["p_type"] == "PT_LOAD"]
        self.exec_ranges = [
            (s["p_vaddr"], s["p_vaddr"] + s["p_memsz"])
            for s in segments
            if s["p_type"] == "PT_LOAD" and s["p_flags"] & 1  # PF_X
        ]
        self._dynamic = next((s for s in segments if s["p_type"] == "PT_DYNAMIC"), None)
        self._relative: dict[int, int] | None = None
        self.text_source = "symtab"  # where function addresses came from; pclntab_symbols sets it
        self.text_start: int | None = None  # runtime.text, once pclntab_symbols found it

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

    def vaddr(self, off: int) -> int | None:
        for va, o, size in self.loads:
            if o <= off < o + size:
                return off - o + va
        return None

    def u(self, off: int, size: int) -> int:
        return int.from_bytes(self.data[off : off + size], "little")

    def relative(self) -> dict[int, int]:
        """R_X86_64_RELATIVE relocations, address -> addend: a PIE's pointers in data. The linker
        may leave the file bytes 0 and put the value in the addend only (DT_RELR keeps it in the
        bytes, so those need nothing here)."""
        if self._relative is None:
            self._relative = {}
            if self._dynamic is not None:
                try:  # DT_RELA/DT_RELASZ from pyelftools, then the 24-byte Elf64_Rela entries in bulk
                    tags = {t.entry.d_tag: t.entry.d_val for t in self._dynamic.iter_tags()}
                except (ELFError, KeyError, ValueError, struct.error):  # damaged: no relocations
                    tags = {}
                off = self.file_offset(tags.get("DT_RELA", 0))
                size = tags.get("DT_RELASZ", 0) // 24 * 24
                if off is not None and size:
                    for r_offset, r_info, r_addend in struct.iter_unpack("<QQq", self.data[off : off + size]):
                        if r_info & 0xFFFFFFFF == R_X86_64_RELATIVE:
                            self._relative[r_offset] = r_addend
        return self._relative

    def ptr(self, vaddr: int) -> int | None:
        """The 8-byte pointer at vaddr as the loader leaves it (before adding a PIE's load bias)."""
        addend = self.relative().get(vaddr)
        if addend is not None:
            return addend
        off = self.file_offset(vaddr)
        return None if off is None or off + 8 > len(self.data) else self.u(off, 8)

    def executable(self, vaddr: int) -> bool:
        return any(lo <= vaddr < hi for lo, hi in self.exec_ranges)

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
        try:
            symtab = self.section(".symtab")
            if symtab is not None:
                strtab = self.elf.get_section(symtab["sh_link"]).data()
                out = []
                for name, info, _o, shndx, value, size in struct.iter_unpack("<IBBHQQ", symtab.data()):
                    if info & 0xF == 2 and value:  # STT_FUNC
                        out.append((value, size, strtab[name : strtab.index(b"\0", name)].decode(errors="replace")))
                return sorted(out)
            return self.pclntab_symbols()
        except (ELFError, struct.error, ValueError, IndexError, OverflowError) as e:  # damaged tables
            raise BinaryError(f"{self.path} has a damaged symbol table ({e})", FIX_GO) from None

    def pclntab(self) -> tuple[int, int | None]:
        """File offset and virtual address of the pcHeader (the start of .gopclntab)."""
        sec = self.section(".gopclntab", ".data.rel.ro.gopclntab")
        if sec is not None:
            return sec["sh_offset"], sec["sh_addr"] or self.vaddr(sec["sh_offset"])
        # no section headers for it: find the header by its shape
        m = re.search(rb"[\xf0\xf1\xfa]\xff\xff\xff\x00\x00\x01\x08", self.data)
        if m is None:
            raise BinaryError(f"{self.path} is not a Go program (no .gopclntab)", FIX_GO)
        return m.start(), self.vaddr(m.start())

    def text_base(self, pc_vaddr: int | None, ftab_off: int, ftab_vaddr: int | None, nfunc: int) -> tuple[int, str]:
        """The address .gopclntab's function entry offsets count from (runtime.text).

        Not .text's start: external linking puts C code (crt, cgo) before runtime.text. Not
        pcHeader.textStart either: Go 1.26 stopped writing it (0), and a PIE may leave it for
        a relocation to fill. The runtime itself reads runtime.firstmoduledata.text, so do the
        same: find the moduledata by its pointer to the pcHeader (file bytes, or the addend of an
        R_X86_64_RELATIVE relocation in a PIE) and accept it only when its ftab, minpc and maxpc
        agree with the table (minpc = text + entry[0], maxpc = text + entry[nfunc]).
        """
        first, end = self.u(ftab_off, 4), self.u(ftab_off + 8 * nfunc, 4)
        if pc_vaddr is not None:
            candidates = [va for va, addend in self.relative().items() if addend == pc_vaddr]
            needle = pc_vaddr.to_bytes(8, "little")
            i = self.data.find(needle)
            while i >= 0:
                va = self.vaddr(i)
                if va is not None and i % 8 == 0:
                    candidates.append(va)
                i = self.data.find(needle, i + 1)
            for md in candidates:
                text = self.ptr(md + MD_TEXT)
                if (
                    text
                    and self.executable(text)
                    and self.ptr(md + MD_FTAB) == ftab_vaddr
                    and self.ptr(md + MD_MINPC) == text + first
                    and self.ptr(md + MD_MAXPC) == text + end
                ):
                    return text, "moduledata"
            text = self.ptr(pc_vaddr + 24)  # pcHeader.textStart, Go 1.18-1.25 (the runtime checks it)
        else:
            text = self.u(self.pclntab()[0] + 24, 8)
        if text and self.executable(text) and self.executable(text + end - 1):
            return text, "pcheader"
        raise BinaryError(
            f"{self.path}: cannot tell where .gopclntab's functions start (no runtime.firstmoduledata "
            "matches the table and pcHeader.textStart is empty)",
            "keep the symbol table (build without -s), and report the Go version and build flags",
        )

    def pclntab_symbols(self) -> list[tuple[int, int, str]]:
        off, vaddr = self.pclntab()
        magic, ptr = self.u(off, 4), self.data[off + 7]
        hdr = [self.u(off + 8 + i * ptr, ptr) for i in range(8)]
        if magic in (0xFFFFFFF0, 0xFFFFFFF1):  # nfunc nfiles textStart funcname cu filetab pctab pcln
            nfunc, names, functab = hdr[0], off + hdr[3], off + hdr[7]
            text, self.text_source = self.text_base(vaddr, functab, None if vaddr is None else vaddr + hdr[7], nfunc)
            self.text_start = text
            entry = lambda i: text + self.u(functab + 8 * i, 4)  # noqa: E731
            funcoff = lambda i: self.u(functab + 8 * i + 4, 4)  # noqa: E731
            nameoff = lambda fo: struct.unpack_from("<i", self.data, functab + fo + 4)[0]  # noqa: E731
        elif magic == 0xFFFFFFFA:  # Go 1.16-1.17: nfunc nfiles funcname cu filetab pctab pcln
            nfunc, names, functab = hdr[0], off + hdr[2], off + hdr[6]
            self.text_source = "absolute"  # entries are pointers (relocated in a PIE)
            if vaddr is None:
                entry = lambda i: self.u(functab + 2 * ptr * i, ptr)  # noqa: E731
            else:
                entry = lambda i: self.ptr(vaddr + hdr[6] + 2 * ptr * i) or 0  # noqa: E731
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
        symbols_source=g.text_source if g.text_source == "symtab" else f"gopclntab+{g.text_source}",
    )


def read_support(path: str) -> ReadSupport:
    """Can the sampler read goroutine ids and name stack frames for this binary? Never raises:
    a program it cannot read gets both False and the reason, for the caller to say once."""
    try:
        g = _GoELF(path)
    except BinaryError as e:
        return ReadSupport(False, False, f"goid null and stacks as raw addresses: {e.one_line()}")
    missing = []
    version = g.go_version()
    minor = go_minor(version) if version else None
    goids = False
    if version is None:
        missing.append(f"goid null: {path} is not a Go program (no .go.buildinfo)")
    elif minor is None or minor < MIN_GO_MINOR:
        missing.append(f"goid null: {path} was built by {version}; rebuild it with Go 1.17+")
    elif gooffsets.offsets_for(minor) is None and g.dwarf_offsets() is None:
        missing.append(
            f"goid null: {path} has no DWARF and otelwater's offset table has no Go 1.{minor}; "
            f"build it without -w, or add Go 1.{minor} to otelwater/probes/gooffsets.py"
        )
    else:
        goids = True
    stacks = False
    try:
        stacks = bool(g.symbols())
        if not stacks:
            missing.append(f"stacks as raw addresses: {path} has no function symbols")
    except BinaryError as e:
        missing.append(f"stacks as raw addresses: {e.one_line()}")
    return ReadSupport(goids, stacks, "; ".join(missing) or None)


def no_conn_read(path: str, shown: str | None = None) -> str | None:
    """One line when `path` is a Go program that never reads a network connection through
    net.(*conn).Read (it does not use package net's connections): the Go read sampler will see
    no Go reads of it, whatever the mechanism. None otherwise (a Go program with the function,
    a program that is not Go, or a file this cannot read: other checks speak for those).
    Never raises. `shown`: how to name the binary (default: the path)."""
    try:
        g = _GoELF(path)
        if g.go_version() is None:
            return None                     # not Go (or no buildinfo): not this check's to say
        if any(name == READ_FUNCTION for _, _, name in g.symbols()):
            return None
    except BinaryError:
        return None
    return (f"{shown or path} never reads a network connection through {READ_FUNCTION}, "
            "so no Go reads will be seen")


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
