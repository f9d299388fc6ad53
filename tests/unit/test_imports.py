"""A module imports only what lies below it: records below the sinks, no circles.

1. Every module of the package imports alone in a fresh interpreter (`python -c "import
   otelwater.x"`): an import circle shows up there as an ImportError (a partly initialised
   module), and so does a module that works only when another one happened to come first.
2. The layer table below is the package's intended shape. Every `import otelwater...` and
   `from otelwater... import` of a module, at module level and inside functions alike (read
   with ast, nothing imported), names a module of a lower rank or of its own group: two groups
   on one rank sit beside each other and do not import each other.
3. No circles in that same graph, functions' imports included (an import inside a function
   hides a circle from test 1 but not from the design).
4. Only probes/ imports bcc, so `otelwater correlate` and all pure logic run without root/BCC.
5. No module imports another package's private (`_name`) names: modules of one package may
   share them, nothing outside it may reach in (as cli.py did for probes/goread.py's _pid_exe).
6. pyproject.toml lists every package (it has to name them, to ship bpf/ as otelwater/bpf).
"""

from __future__ import annotations

import ast
import fnmatch
import os
import pkgutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "otelwater"

# (rank, group, module patterns). A module imports from a lower rank or from its own group.
LAYERS = [
    (0, "base", ("otelwater", "otelwater.errors", "otelwater.config", "otelwater.sockkey",
                 "otelwater.clock", "otelwater.names")),
    (1, "records", ("otelwater.events", "otelwater.events.*")),
    (1, "host facts", ("otelwater.hostsockets",)),
    (2, "analysis", ("otelwater.correlate", "otelwater.correlate.*", "otelwater.alerts",
                     "otelwater.alerts.*", "otelwater.analysis", "otelwater.analysis.*")),
    (2, "sources", ("otelwater.probes", "otelwater.probes.*", "otelwater.sockdiag")),
    (3, "sinks", ("otelwater.export", "otelwater.export.*")),
    (4, "pipeline", ("otelwater.pipeline",)),
    (5, "runs", ("otelwater.watch", "otelwater.report", "otelwater.agent", "otelwater.agent.*")),
    (6, "commands", ("otelwater.cli", "otelwater.cli_*", "otelwater.__main__")),
]
BCC_ALLOWED = ("otelwater.probes", "otelwater.probes.*")


# -- the package, read without importing it --------------------------------------------------

@cache
def modules() -> dict[str, Path]:
    """Every module of the package (packages as their __init__.py), name -> file."""
    found = {"otelwater": PACKAGE / "__init__.py"}

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            name = f"{prefix}.{info.name}"
            if info.ispkg:
                found[name] = path / info.name / "__init__.py"
                walk(path / info.name, name)
            else:
                found[name] = path / f"{info.name}.py"

    walk(PACKAGE, "otelwater")
    return dict(sorted(found.items()))


def layer_of(module: str) -> tuple[int, str] | None:
    for rank, group, patterns in LAYERS:
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return rank, group
    return None


def _resolve(module: str, target: str) -> str:
    """The module `target` names: itself when it is one, else the nearest module above it
    (`otelwater.correlate.Correlator` is `otelwater.correlate`)."""
    while target not in modules() and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


@cache
def imports_of(module: str) -> tuple[tuple[str, int, str], ...]:
    """(imported module, line, name imported from it or "") for every import in the file,
    wherever it stands; bcc appears as "bcc"."""
    path = modules()[module]
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "bcc" or alias.name.startswith("bcc."):
                    found.append(("bcc", node.lineno, ""))
                elif alias.name.startswith("otelwater"):
                    found.append((_resolve(module, alias.name), node.lineno, ""))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source == "bcc" or source.startswith("bcc."):
                found.append(("bcc", node.lineno, ""))
                continue
            if not (source == "otelwater" or source.startswith("otelwater.")):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in modules():  # `from otelwater.export import otlp`: the module
                    found.append((full, node.lineno, ""))
                else:
                    found.append((_resolve(module, source), node.lineno, alias.name))
    return tuple(found)


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports_of(m) if t != "bcc" and t != m} for m in modules()}


# -- 1. each module alone ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def imported_alone() -> dict[str, subprocess.CompletedProcess]:
    """Each module imported in its own fresh interpreter, several at a time."""
    def one(name: str) -> subprocess.CompletedProcess:
        # a __main__ runs the command when imported: run it with --help instead
        how = (["-m", name.removesuffix(".__main__"), "--help"] if name.endswith(".__main__")
               else ["-c", f"import {name}"])
        return subprocess.run([sys.executable, *how], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    with ThreadPoolExecutor(max_workers=max(4, 2 * (os.cpu_count() or 1))) as pool:
        return dict(zip(modules(), pool.map(one, modules())))


@pytest.mark.parametrize("name", list(modules()))
def test_module_imports_alone_in_a_fresh_interpreter(name, imported_alone):
    p = imported_alone[name]
    last = p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"]
    assert p.returncode == 0, f"`python {' '.join(p.args[1:])}` failed: {last[0]}\n{p.stderr}"


# -- 2. layers --------------------------------------------------------------------------------

def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == [], \
        "place these modules in LAYERS (tests/unit/test_imports.py)"


def layering_violations() -> list[str]:
    out = []
    for module in modules():
        mine = layer_of(module)
        if mine is None:
            continue
        for target, line, _ in imports_of(module):
            theirs = layer_of(target) if target != "bcc" else None
            if theirs is None or target == module:
                continue
            if theirs[0] > mine[0] or (theirs[0] == mine[0] and theirs[1] != mine[1]):
                why = "up" if theirs[0] > mine[0] else "sideways"
                out.append(f"{module} -> {target} (line {line}: {mine[1]} imports {why} "
                           f"from {theirs[1]})")
    return sorted(set(out))


def test_modules_import_only_from_lower_layers_or_their_own_group():
    violations = layering_violations()
    assert violations == [], "upward or sideways imports:\n  " + "\n  ".join(violations)


# -- 3. circles -------------------------------------------------------------------------------

def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def test_circles_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_even_through_imports_inside_functions():
    g = graph()
    found = []
    for comp in circles(g):
        edges = [f"{a} -> {b}" for a in comp for b in sorted(g[a]) if b in comp]
        found.append(" | ".join(edges))
    assert found == [], "import circles:\n  " + "\n  ".join(found)


# -- 4. bcc -----------------------------------------------------------------------------------

def test_only_probes_import_bcc():
    outside = [f"{m} (line {line})" for m in modules() for t, line, _ in imports_of(m)
               if t == "bcc" and not any(fnmatch.fnmatchcase(m, p) for p in BCC_ALLOWED)]
    assert outside == [], "bcc imported outside probes/: " + ", ".join(outside)


# -- 5. private names -------------------------------------------------------------------------

def package_of(module: str) -> str:
    return module if modules()[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def test_no_module_imports_private_names_of_another_package():
    private = [f"{m} -> {t}.{name} (line {line})" for m in modules()
               for t, line, name in imports_of(m)
               if name.startswith("_") and not name.startswith("__")
               and package_of(t) != package_of(m)]
    assert private == [], "private names imported from another package:\n  " + "\n  ".join(private)


# -- 6. packaging -----------------------------------------------------------------------------

def test_pyproject_lists_every_package_and_ships_bpf():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # every folder holding Python files, with or without an __init__.py yet
    on_disk = {".".join(d.relative_to(ROOT).parts) for d in [PACKAGE, *PACKAGE.rglob("*")]
               if d.is_dir() and any(d.glob("*.py"))}
    assert sorted(tool["packages"]) == sorted(on_disk | {"otelwater.bpf"}), \
        "pyproject.toml's [tool.setuptools] packages must name every package, and otelwater.bpf"
    assert tool["package-dir"] == {"otelwater.bpf": "bpf"}
    globs = tool["package-data"]["otelwater.bpf"]
    shipped = [f.name for f in (ROOT / "bpf").iterdir() if f.is_file()]
    missing = [n for n in shipped if not any(fnmatch.fnmatchcase(n, g) for g in globs)]
    assert any(n.endswith(".h") for n in shipped) and missing == [], \
        f"bpf/ files the wheel would leave out: {missing}"


# -- the reading itself -----------------------------------------------------------------------

def test_imports_are_read_at_module_level_and_inside_functions():
    assert ("otelwater.events.layout", "header") in {
        (t, name) for t, _, name in imports_of("otelwater.events.model")}
    got = {t for t, _, _ in imports_of("otelwater.probes.loader")}
    assert {"bcc", "otelwater.events.layout", "otelwater.probes.btf"} <= got  # btf: in a function
    assert _resolve("x", "otelwater.correlate.Correlator") == "otelwater.correlate"
    assert layer_of("otelwater") == (0, "base")
    assert layer_of("otelwater.cli_record") == (6, "commands")
    assert layer_of("otelwater.export.otlp") == (3, "sinks")
    assert package_of("otelwater.probes.goread") == "otelwater.probes"
    assert package_of("otelwater.probes") == "otelwater.probes"
