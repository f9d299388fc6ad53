"""Where the example Go programs are: built by scripts/setup.sh (scripts/setup-go.sh) into
examples/bin, one folder per toolchain, listed in examples/bin/toolchains.json. Tests that need
them skip, naming the fix, when they are not built (scripts/test.sh always builds them)."""

import json
from pathlib import Path

import pytest

BIN = Path(__file__).resolve().parents[1] / "examples" / "bin"
NOT_BUILT = (f"{BIN}/toolchains.json is missing or incomplete: run scripts/setup.sh (as root) "
             "to build the Go examples")
# every toolchain builds slowreader these ways (scripts/setup-go.sh VARIANTS), and loadgen
SLOWREADERS = tuple(f"slowreader{pie}{ext}{strip}" for pie in ("", "-pie") for ext in ("", "-ext")
                    for strip in ("", "-stripped"))


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


def fixture(name: str) -> str:
    path = BIN / "fixtures" / name
    if not path.is_file():
        pytest.skip(f"fixtures/{name} is not built: {NOT_BUILT}")
    return str(path)
