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


def prog_ids_of(pid: int | str = "self") -> set[int]:
    """IDs of the BPF programs a process holds open (what BCC keeps attached)."""
    ids = set()
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            if os.readlink(f"{base}/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def live_prog_ids() -> set[int]:
    """IDs of every BPF program loaded on the host."""
    import json

    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"] for p in json.loads(out)}


def gone(ids: set[int], timeout_s: float = 3.0) -> bool:
    """True once none of these programs is loaded (the kernel frees them after an RCU grace
    period, so a just-closed program can linger for a moment)."""
    import time

    end = time.monotonic() + timeout_s
    while ids & live_prog_ids():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True
