"""The repository stands alone: it cites only what a user of it has.

1. No file cites the founders' private notes (the design, machine, Go-uprobe and style notes
   that preceded docs/) or a path of one particular machine (its work tree, a home directory, a
   sibling "shared" folder). The facts live in docs/; cite those.
2. Every relative link in the Markdown files points at a file that exists, and a link with an
   anchor (`docs/kernel.md#the-probe-floor`) at a heading that exists.

Files are the repository's own: tracked plus new files not ignored (`git ls-files --cached
--others --exclude-standard`), so a file not yet added is checked too.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Each pattern is written so that it does not match its own source text.
FORBIDDEN = [
    ("a private note", re.compile(r"\b(?:DESIGN|MACHINE|GO-UPROBES|STYLE)\.md\b")),
    ("a path of the build machine", re.compile(r"(?<![\w.~-])/wor[k](?:/|\b)")),
    ("a sibling shared folder", re.compile(r"\.\./share[d]\b")),
    ("a home directory", re.compile(r"(?<![\w.-])(?:/hom[e]/\w|/roo[t]/|~[/])")),
]

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)",
                  re.M)
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def repo_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout with git available: {e}")
    paths = sorted({ROOT / p for p in out.decode().split("\0") if p})
    return [p for p in paths if p.is_file()]  # a tracked file deleted in the work tree is gone


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def forbidden_citations(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, the line) for each line citing something a user does not have."""
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN:
            if pattern.search(line):
                hits.append((n, what, line.strip()))
    return hits


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)  # a link in a heading keeps its text
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def strip_code(text: str) -> str:
    """The Markdown without fenced code blocks and code spans (links there are not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown file's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in lines_outside_fences(text):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def lines_outside_fences(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def broken_links(md: Path, root: Path = ROOT) -> list[tuple[int, str, str]]:
    """(line number, target, why) for each relative link of a Markdown file that leads nowhere."""
    text = md.read_text(encoding="utf-8")
    body = strip_code(text)
    bad = []
    for n, line in enumerate(body.splitlines(), 1):
        targets = [a or b for a, b in LINK.findall(line)] + IMAGE.findall(line)
        for target in targets:
            if SCHEME.match(target):
                continue  # http:, https:, mailto: ... are not files of this repository
            path_part, _, anchor = target.partition("#")
            dest = (md.parent / path_part).resolve() if path_part else md
            if not dest.exists():
                bad.append((n, target, "no such file"))
                continue
            try:
                dest.relative_to(root)
            except ValueError:
                bad.append((n, target, "outside the repository"))
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                bad.append((n, target, f"no heading with anchor #{anchor} in {dest.relative_to(root)}"))
    return bad


# -- the detectors themselves can fail --------------------------------------------------------

@pytest.mark.parametrize("line", [
    "see " + "MACHINE" + ".md for the offsets",
    "(" + "GO-UPROBES" + ".md, last part)",
    "DESIGN" + ".md part 5",
    "STYLE" + ".md says",
    "read " + "/wo" + "rk/shared/notes.txt",
    "cat ../" + "shared/x",
    "/ho" + "me/alice/otelwater",
    "/ro" + "ot/.cache/x",
    "~" + "/src/otelwater",
])
def test_detector_flags_each_kind(line):
    assert forbidden_citations(line), line


@pytest.mark.parametrize("line", [
    "docs/kernel.md has the table",
    "/proc/PID/root/usr/bin/app",       # a process's root, not a home directory
    "/sys/kernel/tracing/events",
    "examples/bin/go1.23.9/slowreader",
    "the framework/ directory",
])
def test_detector_passes_ordinary_paths(line):
    assert not forbidden_citations(line), line


def test_link_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## The probe floor\n\n## Dup\n\n## Dup\n")
    md = tmp_path / "README.md"
    md.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#the-probe-floor) [ok](docs/a.md#dup-1) [web](https://x.org/y)\n"
        "[gone](docs/b.md)\n"
        "[bad anchor](docs/a.md#nothing)\n"
        "`[code](not/a/link.md)`\n"
        "```\n[fenced](not/a/link.md)\n```\n"
        "[ref]: docs/missing.md\n")
    assert [(n, t) for n, t, _ in broken_links(md, tmp_path)] == [
        (2, "docs/b.md"), (3, "docs/a.md#nothing"), (8, "docs/missing.md")]


# -- the repository ---------------------------------------------------------------------------

def test_no_file_cites_what_a_user_does_not_have():
    problems = []
    for path in repo_files():
        text = text_of(path)
        if text is None:
            continue
        for n, what, line in forbidden_citations(text):
            problems.append(f"{path.relative_to(ROOT)}:{n}: cites {what}: {line[:120]}")
    assert not problems, "cite docs/*.md instead:\n" + "\n".join(problems)


def test_docs_exist_and_readme_links_them():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("design.md", "kernel.md", "go.md"):
        assert (ROOT / "docs" / name).is_file(), f"docs/{name} is missing"
        assert f"(docs/{name})" in readme, f"README.md does not link docs/{name}"


def test_relative_links_in_markdown_point_at_files():
    mds = [p for p in repo_files() if p.suffix == ".md"]
    assert ROOT / "README.md" in mds
    problems = [f"{md.relative_to(ROOT)}:{n}: {target}: {why}"
                for md in mds for n, target, why in broken_links(md)]
    assert not problems, "\n".join(problems)
