"""A BPF compile that LLVM ends with exit(1) (the BPF stack limit) still says why, in one line,
and a process that compiled successfully still exits with its own code: the C-level exit
hook of otelwater/probes/loader.py lives only while a compile's output is captured."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("bpf_ready")]

PRELUDE = """
import sys
from bcc import BPF
from otelwater.probes.loader import captured_stderr_fd
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_llvm_exit_inside_a_capture_is_said():
    r = run("""
        src = '''RAW_TRACEPOINT_PROBE(sock_recv_length) {
            volatile char buf[600];
            for (int i = 0; i < 600; i++) buf[i] = i;
            return buf[ctx->args[1] & 511];
        }'''
        with captured_stderr_fd():
            BPF(text=src)
        print("not reached")
    """)
    assert r.returncode == 1
    assert "not reached" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("otelwater: the BPF program did not compile: "), r.stderr
    assert "stack limit" in lines[0], r.stderr


def test_a_normal_exit_after_captures_keeps_its_code():
    r = run("""
        with captured_stderr_fd():
            b = BPF(text="RAW_TRACEPOINT_PROBE(sock_recv_length) { return 0; }")
        b.cleanup()
        with captured_stderr_fd():
            pass
        print("done")
        sys.exit(3)
    """)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (3, "done", "")
