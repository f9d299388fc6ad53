"""Where the example Go programs are: built by scripts/setup.sh (scripts/setup-go.sh) into
examples/bin, one folder per toolchain, listed in examples/bin/toolchains.json."""

import json
from pathlib import Path

BIN = Path(__file__).resolve().parents[1] / "examples" / "bin"
NOT_BUILT = (f"{BIN}/toolchains.json is missing or incomplete: run scripts/setup.sh (as root) "
             "to build the Go examples")


def toolchains() -> dict:
    try:
        return json.loads((BIN / "toolchains.json").read_text())
    except (OSError, ValueError):
        return {}
