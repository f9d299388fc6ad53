"""Where the example Go programs are: built by scripts/setup.sh (scripts/setup-go.sh) into
examples/bin, one folder per toolchain, listed in examples/bin/toolchains.json. Tests that need
them skip, naming the fix, when they are not built (scripts/test.sh always builds them)."""

import json
from pathlib import Path

import pytest

BIN = Path(__file__).resolve().parents[1] / "examples" / "bin"
NOT_BUILT = (f"{BIN}/toolchains.json is missing or incomplete: run scripts/setup.sh (as root) "
             "to build the Go examples")
# every toolchain builds slowreader these ways (scripts/setup-go.sh VARIANTS), loadgen, and
# httpchain plain and stripped; Debian's Go alone builds pgclient and redisclient (GOPATH mode,
# from Debian's Go packages: absent when those are not installed)
SLOWREADERS = tuple(f"slowreader{pie}{ext}{strip}" for pie in ("", "-pie") for ext in ("", "-ext")
                    for strip in ("", "-stripped"))
HTTPCHAINS = ("httpchain", "httpchain-stripped")


def toolchains() -> dict:
    try:
        return json.loads((BIN / "toolchains.json").read_text())
    except (OSError, ValueError):
        return {}


def versions() -> list[str]:
    """Go versions to parametrize over; one placeholder (whose tests skip) when none is built."""
    return sorted(toolchains()) or ["examples-not-built"]


def built(version: str, name: str) -> str:
    """Path of one example binary of one toolchain; skips the test when it is not built."""
    listed = toolchains()
    if not listed:
        pytest.skip(f"the Go examples are not built: {NOT_BUILT}")
    path = listed.get(version, {}).get(name)
    if not path or not Path(path).is_file():
        pytest.skip(f"{version}/{name} is not built: {NOT_BUILT}")
    return path


def newest() -> str:
    """The newest Go version built (by version number, not by name)."""
    listed = toolchains()
    if not listed:
        pytest.skip(f"the Go examples are not built: {NOT_BUILT}")
    return max(listed, key=lambda v: tuple(int(x) for x in v.removeprefix("go").split(".")))


def debian(name: str) -> str:
    """Debian's Go build of one example: examples/bin/NAME (setup-go.sh's link); skips the test
    when it is not built."""
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"examples/bin/{name} is not built: {NOT_BUILT}")
    return str(path)


def fixture(name: str) -> str:
    path = BIN / "fixtures" / name
    if not path.is_file():
        pytest.skip(f"fixtures/{name} is not built: {NOT_BUILT}")
    return str(path)
