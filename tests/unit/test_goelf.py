"""locate(), Symbolizer and read_support() on slowreader as every toolchain builds it
(scripts/setup-go.sh): {plain, stripped} x {non-PIE, PIE} x {internal, external (cgo) linking},
checked against the .symtab of the unstripped sibling read with pyelftools alone; and
BinaryError on inputs that are not usable Go x86-64 programs. Skips, naming scripts/setup.sh,
when the examples are not built."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from elftools.elf.elffile import ELFFile

from otelwater.cli_locate import locate_command
from otelwater.errors import BinaryError
from otelwater.probes import gooffsets
from otelwater.probes.goelf import (
    READ_FUNCTION,
    ReadSupport,
    Symbolizer,
    _GoELF,
    go_minor,
    locate,
    no_conn_read,
    read_support,
    return_offsets,
)
from tests.goexamples import NOT_BUILT, SLOWREADERS, built, fixture, toolchains, versions

cached_locate = functools.lru_cache(locate)  # DWARF parsing is the slow part (~0.4 s a binary)

VERSIONS = versions()
PLAIN = [v for v in SLOWREADERS if not v.endswith("-stripped")]


@functools.lru_cache
def symtab(path: str) -> dict[str, tuple[int, int]]:
    """name -> (address, size) of the functions in .symtab, by pyelftools only (the reference).
    A name twice (ABI wrapper + body): the larger, as locate keeps."""
    out: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f:
        for sym in ELFFile(f).get_section_by_name(".symtab").iter_symbols():
            if sym["st_info"]["type"] == "STT_FUNC" and sym["st_value"]:
                if sym.name not in out or sym["st_size"] > out[sym.name][1]:
                    out[sym.name] = (sym["st_value"], sym["st_size"])
    return out


def sibling(variant: str) -> str:
    return variant.removesuffix("-stripped")


def test_examples_are_built_with_several_go_versions():
    if not toolchains():
        pytest.skip(f"the Go examples are not built: {NOT_BUILT}")
    assert len(toolchains()) >= 3


def mnemonics(code: bytes) -> list[str]:
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    return [m for _a, _s, m, _o in Cs(CS_ARCH_X86, CS_MODE_64).disasm_lite(code, 0)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", SLOWREADERS)
def test_locate_finds_read_and_its_ret_sites(version, variant):
    path = built(version, variant)
    ref_addr, ref_size = symtab(built(version, sibling(variant)))[READ_FUNCTION]
    info = cached_locate(path)
    assert info.go_version == version
    assert info.stripped is variant.endswith("-stripped")
    assert info.pie is ("-pie" in variant)
    assert info.offsets_source == ("table" if info.stripped else "dwarf")
    assert info.symbols_source == ("gopclntab+moduledata" if info.stripped else "symtab")
    f = info.functions[READ_FUNCTION]
    assert f.address == ref_addr
    data = Path(path).read_bytes()
    assert f.return_offsets and all(0 < off < ref_size for off in f.return_offsets)
    assert all(data[f.file_offset + off] == 0xC3 for off in f.return_offsets)
    # the code at file_offset is the sibling's function: the same instructions (call and jump
    # displacements may differ: stripping and linking can move the functions they reach)
    sib = _GoELF(built(version, sibling(variant)))
    mine = data[f.file_offset : f.file_offset + ref_size]
    theirs = sib.data[sib.file_offset(ref_addr) : sib.file_offset(ref_addr) + ref_size]
    assert mnemonics(mine) == mnemonics(theirs)
    js = info.to_json()
    assert js["functions"][READ_FUNCTION]["return_offsets"] == list(f.return_offsets)
    assert json.loads(json.dumps(js)) == js


@pytest.mark.parametrize("version", VERSIONS)
def test_every_build_agrees_on_read_code(version):
    """Linking and stripping move the function, never change its return sites."""
    rets = {cached_locate(built(version, v)).functions[READ_FUNCTION].return_offsets for v in SLOWREADERS}
    assert len(rets) == 1


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", PLAIN)
def test_text_base_is_runtime_text(version, variant):
    """The base .gopclntab counts from is runtime.text, found through runtime.firstmoduledata:
    under external linking .text starts with C code, and Go 1.26+ leaves pcHeader.textStart 0."""
    path = built(version, variant)
    g = _GoELF(path)
    pcln = {(addr, name) for addr, _, name in g.pclntab_symbols()}
    assert g.text_source == "moduledata"
    assert g.text_start == symtab(path)["runtime.text"][0]
    names = {name for _, name in pcln}
    ref = {(addr, name) for name, (addr, _) in symtab(path).items() if name in names}
    assert len(ref) > 1000 and ref <= pcln


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", PLAIN)
def test_table_offsets_equal_dwarf_offsets(version, variant):
    """The per-version table is right for every Go version and build mode we can build."""
    info = cached_locate(built(version, variant))
    assert info.offsets_source == "dwarf"
    assert gooffsets.offsets_for(go_minor(version)) == info.offsets


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", SLOWREADERS)
def test_symbolizer_matches_symtab(version, variant):
    """Names for a sample of the Go functions (every 20th, and main's) at their first and last
    byte, in ELF virtual addresses (a PIE's too: the sampler subtracts the load bias first)."""
    ref = symtab(built(version, sibling(variant)))
    s = Symbolizer(built(version, variant))
    go_funcs = sorted((a, size, n) for n, (a, size) in ref.items() if size and s.lookup(a) is not None)
    sample = go_funcs[::20] + [(*ref[n], n) for n in ("main.readOnce", "main.handleConn", "main.main", READ_FUNCTION)]
    assert len(go_funcs) > 1000 and len(sample) > 50
    for addr, size, name in sample:
        if variant.endswith("-stripped"):  # .symtab marks assembly functions, .gopclntab does not
            name = name.removesuffix(".abi0")
        assert s.lookup(addr) == s.lookup(addr + size - 1) == name, f"{name} at {addr:#x}"
    assert s.lookup(0) is None


def _zero_relocated(src: str, dst: Path) -> str:
    """A copy of a PIE whose every R_X86_64_RELATIVE target is 0 in the file, as linkers may
    leave it (the value lives only in the relocation's addend)."""
    g = _GoELF(src)
    data = bytearray(g.data)
    for vaddr in g.relative():
        off = g.file_offset(vaddr)
        if off is not None:
            data[off : off + 8] = bytes(8)
    dst.write_bytes(data)
    return str(dst)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", ["slowreader-pie-stripped", "slowreader-pie-ext-stripped"])
def test_pie_pointers_come_from_relocations(tmp_path, version, variant):
    path = built(version, variant)
    g = _GoELF(path)
    assert len(g.relative()) > 1000
    copy = _zero_relocated(path, tmp_path / variant)
    assert locate(copy).functions == cached_locate(path).functions


def _without_moduledata(src: str, dst: Path) -> str:
    """A copy of a non-PIE whose pointers to the pcHeader are 0: no runtime.firstmoduledata."""
    g = _GoELF(src)
    data = bytearray(g.data)
    needle = g.pclntab()[1].to_bytes(8, "little")
    while (i := data.find(needle)) >= 0:
        data[i : i + 8] = bytes(8)
    dst.write_bytes(data)
    return str(dst)


@pytest.mark.parametrize("version", VERSIONS)
def test_without_moduledata_pcheader_or_a_clear_error(tmp_path, version):
    """Before Go 1.26 pcHeader.textStart is the fallback (the runtime checks it equals
    moduledata.text); from 1.26 it is 0, and a wrong address is never guessed."""
    path = built(version, "slowreader-ext-stripped")
    copy = _without_moduledata(path, tmp_path / "nomd")
    if go_minor(version) < 26:
        info = locate(copy)
        assert info.symbols_source == "gopclntab+pcheader"
        assert info.functions == cached_locate(path).functions
        assert read_support(copy) == ReadSupport(True, True, None)
    else:
        with pytest.raises(BinaryError, match="cannot tell where .gopclntab's functions start"):
            locate(copy)
        support = read_support(copy)
        assert support.goids and not support.stacks
        assert support.reason.startswith("stacks as raw addresses: ") and "\n" not in support.reason


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", SLOWREADERS)
def test_read_support_of_every_build(version, variant):
    assert read_support(built(version, variant)) == ReadSupport(True, True, None)


def test_read_support_says_why_not(tmp_path, monkeypatch):
    ls = read_support("/bin/ls")
    assert not ls.goids and "not a Go program" in ls.reason
    arm = read_support(fixture("slowreader-arm64"))
    assert (arm.goids, arm.stacks) == (False, False) and "not x86-64" in arm.reason
    missing = read_support(str(tmp_path / "absent"))
    assert (missing.goids, missing.stacks) == (False, False) and "cannot read" in missing.reason
    monkeypatch.setattr(gooffsets, "OFFSETS", {})
    stripped = read_support(built(VERSIONS[-1], "slowreader-stripped"))
    assert (stripped.goids, stripped.stacks) == (False, True) and "gooffsets.py" in stripped.reason


def test_pie_fixture():
    info = locate(fixture("slowreader-pie"))
    assert info.pie and info.functions[READ_FUNCTION].return_offsets


def test_return_offsets_stop_at_int3_padding():
    code = bytes.fromhex("4889c3" "c3" "90" "c3" "cc" "c3")  # mov; ret; nop; ret; int3; ret
    assert return_offsets(code, 0x1000) == (3, 5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: str(tmp / "absent"), "cannot read"),
        (lambda tmp: _write(tmp / "notes.txt", b"hello\n"), "is not an ELF"),
        (lambda tmp: _write(tmp / "empty", b""), "is not an ELF"),
        (lambda tmp: "/bin/ls", "is not a Go program"),
        (lambda tmp: fixture("slowreader-arm64"), "not x86-64"),
        (lambda tmp: fixture("nonet"), "has no net.(*conn).Read"),
        (lambda tmp: _old_go(tmp), "otelwater needs Go 1.17 or newer"),
    ],
    ids=["missing", "text", "empty", "non-go-elf", "arm64", "no-net", "go1.16"],
)
def test_bad_inputs_raise_binary_error(tmp_path, make, message):
    with pytest.raises(BinaryError) as e:
        locate(make(tmp_path))
    assert message in e.value.message
    assert e.value.fix and "\n" not in e.value.one_line()


def test_unknown_version_without_dwarf_is_a_clear_error(monkeypatch):
    path = built(VERSIONS[0], "slowreader-stripped")
    monkeypatch.setattr(gooffsets, "OFFSETS", {})
    with pytest.raises(BinaryError, match=rf"offset table has no Go 1\.{go_minor(VERSIONS[0])} "):
        locate(path)


def test_cli_summary_and_json():
    path = built(VERSIONS[-1], "slowreader-pie-ext-stripped")
    out = CliRunner().invoke(locate_command, [path])
    assert out.exit_code == 0 and READ_FUNCTION in out.output and "table" in out.output
    out = CliRunner().invoke(locate_command, ["--json", path])
    assert json.loads(out.output) == locate(path).to_json()
    assert "Examples:" in CliRunner().invoke(locate_command, ["--help"]).output
    assert isinstance(CliRunner().invoke(locate_command, ["/bin/ls"]).exception, BinaryError)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _old_go(tmp: Path) -> str:
    """A copy of a real build whose .go.buildinfo claims Go 1.16 (same string length)."""
    version = VERSIONS[0].encode()
    data = Path(built(VERSIONS[0], "slowreader-stripped")).read_bytes()
    j = data.index(version, data.index(b"\xff Go buildinf:"))
    return _write(tmp / "old", data[:j] + b"go1.16" + data[j + 6 :])



def test_a_go_program_without_conn_read_is_said_in_one_line(tmp_path):
    # fixtures/nonet is Go without package net: --go-binary on it would see no Go reads
    path = fixture("nonet")
    assert no_conn_read(path) == (f"{path} never reads a network connection through "
                                  "net.(*conn).Read, so no Go reads will be seen")
    assert no_conn_read(path, shown="process 7 (nonet)").startswith("process 7 (nonet) never")
    import shutil
    import subprocess

    if shutil.which("strip"):    # stripped: the names come from .gopclntab, same answer
        stripped = tmp_path / "nonet-stripped"
        subprocess.run(["strip", "-o", str(stripped), path], check=True)
        assert _GoELF(str(stripped)).section(".symtab") is None
        assert no_conn_read(str(stripped)).startswith(f"{stripped} never reads")


@pytest.mark.parametrize("make", [
    lambda tmp: built(VERSIONS[0], "slowreader"),
    lambda tmp: built(VERSIONS[-1], "slowreader-pie-ext-stripped"),
    lambda tmp: "/bin/ls",                        # not Go: traced by tracepoints, no notice
    lambda tmp: _write(tmp / "notes.txt", b"hello\n"),
    lambda tmp: str(tmp / "absent"),
], ids=["go", "go-stripped", "not-go", "text", "missing"])
def test_no_notice_for_programs_with_conn_read_or_not_go(tmp_path, make):
    assert no_conn_read(make(tmp_path)) is None
