"""Integration tests load real BPF programs: they need root. Without root they skip with that
reason; as root, anything else missing (BCC, BTF, headers, tools) is a failure, because
scripts/setup.sh installs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OTELWATER = [sys.executable, "-m", "otelwater"]


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root to load BPF programs (run scripts/test.sh as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bpf_ready():
    from otelwater.probes import host

    host.require_can_trace()  # raises (fails the test) when root but the host lacks something
    for tool in ("ss", "bpftool"):
        assert shutil.which(tool), f"{tool} missing: run scripts/setup.sh"


def otelwater_progs() -> list[str]:
    """Names of loaded BPF programs that belong to otelwater (BCC names them after the C
    function, truncated by the kernel to 15 characters)."""
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True,
                         check=True).stdout
    import json

    names = [p.get("name", "") for p in json.loads(out)]
    ours = ("tracepoint__", "raw_tracepoint__", "kfree_skb", "otw_")
    return [n for n in names if n.startswith(ours)]
