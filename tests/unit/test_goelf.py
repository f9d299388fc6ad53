"""locate() and Symbolizer on the examples built by every toolchain (scripts/setup-go.sh), plain
and stripped, and BinaryError on inputs that are not usable Go x86-64 programs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from otelwater.cli_locate import locate_command
from otelwater.errors import BinaryError
from otelwater.probes import gooffsets
from otelwater.probes.goelf import READ_FUNCTION, Symbolizer, _GoELF, go_minor, locate, return_offsets

cached_locate = functools.lru_cache(locate)  # DWARF parsing is the slow part (~0.4 s a binary)

from tests.goexamples import BIN, NOT_BUILT
from tests.goexamples import toolchains as _toolchains


VERSIONS = sorted(_toolchains()) or ["examples-not-built"]


def built(version: str) -> dict[str, str]:
    """The example binaries of one toolchain; fails (never skips) when they are not built."""
    paths = _toolchains().get(version)
    if not paths or not all(Path(p).is_file() for p in paths.values()):
        pytest.fail(NOT_BUILT)
    return paths


def fixture(name: str) -> str:
    path = BIN / "fixtures" / name
    if not path.is_file():
        pytest.fail(NOT_BUILT)
    return str(path)


def test_examples_are_built_with_several_go_versions():
    assert len(_toolchains()) >= 3, NOT_BUILT


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", ["slowreader", "slowreader-stripped"])
def test_locate_finds_read_and_its_ret_sites(version, variant):
    path = built(version)[variant]
    info = cached_locate(path)
    assert info.go_version == version
    assert info.stripped is (variant == "slowreader-stripped")
    assert info.pie is False
    assert info.offsets_source == ("table" if info.stripped else "dwarf")
    assert set(gooffsets.FIELDS) <= set(info.offsets)
    f = info.functions[READ_FUNCTION]
    data = Path(path).read_bytes()
    assert f.return_offsets and all(0 < off < f.size for off in f.return_offsets)
    assert all(data[f.file_offset + off] == 0xC3 for off in f.return_offsets)
    js = info.to_json()
    assert js["functions"][READ_FUNCTION]["return_offsets"] == list(f.return_offsets)
    assert json.loads(json.dumps(js)) == js


@pytest.mark.parametrize("version", VERSIONS)
def test_table_offsets_equal_dwarf_offsets(version):
    """The per-version table is right for every Go version we can build."""
    info = cached_locate(built(version)["slowreader"])
    assert info.offsets_source == "dwarf"
    assert gooffsets.offsets_for(go_minor(version)) == info.offsets


@pytest.mark.parametrize("version", VERSIONS)
def test_stripped_and_plain_agree(version):
    plain, stripped = (cached_locate(built(version)[v]) for v in ("slowreader", "slowreader-stripped"))
    a, b = plain.functions[READ_FUNCTION], stripped.functions[READ_FUNCTION]
    assert (a.address, a.return_offsets) == (b.address, b.return_offsets)
    assert a.size <= b.size  # .gopclntab sizes include the int3 padding
    assert plain.offsets == stripped.offsets


@pytest.mark.parametrize("version", VERSIONS)
def test_pclntab_agrees_with_symtab(version):
    g = _GoELF(built(version)["slowreader"])
    pcln = set((addr, name) for addr, _, name in g.pclntab_symbols())
    names = {name for _, name in pcln}
    symtab = {(addr, name) for addr, _, name in g.symbols() if name in names}
    assert len(symtab) > 1000 and symtab <= pcln


@pytest.mark.parametrize("version", VERSIONS)
def test_symbolizer_names_main_functions(version):
    paths = built(version)
    syms = {name: (addr, size) for addr, size, name in _GoELF(paths["slowreader"]).symbols()}
    for variant in ("slowreader", "slowreader-stripped"):
        s = Symbolizer(paths[variant])
        for name in ("main.readOnce", "main.handleConn", "main.main", READ_FUNCTION):
            addr, size = syms[name]
            assert s.lookup(addr) == s.lookup(addr + size - 1) == name
        assert s.lookup(0) is None


def test_pie_binary():
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
    monkeypatch.setattr(gooffsets, "OFFSETS", {})
    with pytest.raises(BinaryError, match=rf"offset table has no Go 1\.{go_minor(VERSIONS[0])} "):
        locate(built(VERSIONS[0])["slowreader-stripped"])


def test_cli_summary_and_json():
    path = built(VERSIONS[-1])["slowreader-stripped"]
    out = CliRunner().invoke(locate_command, [path])
    assert out.exit_code == 0 and READ_FUNCTION in out.output and "table" in out.output
    out = CliRunner().invoke(locate_command, ["--json", path])
    assert json.loads(out.output) == locate(path).to_json()
    assert "examples:" in CliRunner().invoke(locate_command, ["--help"]).output
    assert isinstance(CliRunner().invoke(locate_command, ["/bin/ls"]).exception, BinaryError)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _old_go(tmp: Path) -> str:
    """A copy of a real build whose .go.buildinfo claims Go 1.16 (same string length)."""
    version = VERSIONS[0].encode()
    data = Path(built(VERSIONS[0])["slowreader-stripped"]).read_bytes()
    j = data.index(version, data.index(b"\xff Go buildinf:"))
    return _write(tmp / "old", data[:j] + b"go1.16" + data[j + 6 :])
