"""What every otelwater BPF program needs to be built and loaded, in one place: the running
kernel's offsets as -D flags, the ring-buffer size check, and BCC's compile/load failures
turned into one-line ProbeLoadErrors. Used by the water probe and both Go read samplers.

BCC writes clang's diagnostics and the verifier's log straight to file descriptor 2, so a load
runs with fd 2 captured: on failure the error line quotes the first compiler error and
`details` (printed by --verbose) holds the whole log and the cflags; on success the log (clang
warnings) is dropped."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from otelwater.errors import ProbeLoadError, UsageError
from otelwater.events.layout import BPF_DIR
from otelwater.probes import host


def one_line(e: BaseException) -> str:
    """The first line of an exception's text (BCC puts whole compiler logs in them)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# A BPF ring buffer's size (max_entries, u32) must be a power of two and a page multiple.
MAX_RINGBUF_PAGES = (1 << 31) // PAGE_SIZE


def check_ringbuf_pages(pages: int) -> None:
    if not 1 <= pages <= MAX_RINGBUF_PAGES or pages & (pages - 1):
        raise UsageError(f"ring buffer pages must be a power of two from 1 to "
                         f"{MAX_RINGBUF_PAGES} ({MAX_RINGBUF_PAGES * PAGE_SIZE >> 30} GiB, the "
                         f"kernel's limit), got {pages}", "e.g. --ringbuf-pages 64 (the default), 128, 256")


def kernel_cflags(offsets: dict[str, int], ringbuf_pages: int) -> list[str]:
    """The include path, every BTF offset as -D, and the ring buffer size."""
    check_ringbuf_pages(ringbuf_pages)
    flags = [f"-I{BPF_DIR}"]
    flags += [f"-D{k}={v}" for k, v in sorted(offsets.items())]
    flags.append(f"-DOTW_RINGBUF_PAGES={ringbuf_pages}")
    return flags


def running_kernel_btf():
    """The running kernel's BTF (or OTELWATER_BTF's), after the host checks."""
    host.require_can_trace()
    from otelwater.probes.btf import Btf

    return Btf.load(host.btf_path())


@contextlib.contextmanager
def captured_stderr_fd():
    """Everything written to file descriptor 2 meanwhile (by C code too), as .text after."""
    class Log:
        text = ""

    log = Log()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield log
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                tmp.seek(0)
                log.text = tmp.read().decode(errors="replace")
    finally:
        os.close(saved)


def first_error(log: str) -> str | None:
    """The first line of a BCC log that says what went wrong (clang's `error:`, a map)."""
    for line in log.splitlines():
        if " error: " in line or line.startswith(("error: ", "could not open bpf map")):
            return line.strip()
    return None


def main_source(src: str, embed: tuple[str, ...] = ()) -> str:
    """bpf/<src>'s text with each `#include "<name>"` of `embed` replaced by that file's text:
    BCC makes programs only of the functions in its main file, not of included ones."""
    text = (BPF_DIR / src).read_text()
    for name in embed:
        line = f'#include "{name}"'
        if line not in text:
            raise ProbeLoadError(f"bpf/{src} does not include {name}")
        text = text.replace(line, (BPF_DIR / name).read_text(), 1)
    return text


def load_bpf(src: str, cflags: list[str], what: str, embed: tuple[str, ...] = ()):
    """Compile and load bpf/<src> (with the files of `embed` inlined: main_source) with BCC;
    any failure is one ProbeLoadError line whose details (printed by --verbose) are BCC's
    whole output and the cflags."""
    from bcc import BPF  # host.require_can_trace() has checked that it imports

    path = BPF_DIR / src
    try:
        with captured_stderr_fd() as log:
            if embed:
                return BPF(text=main_source(src, embed), cflags=cflags)
            return BPF(src_file=str(path), cflags=cflags)
    except Exception as e:  # BCC raises bare Exception for compile and load failures
        reason = one_line(e)
        if reason.startswith("Failed to compile"):  # BCC compiles bpf/<src> as /virtual/main.c
            reason = first_error(log.text) or reason
            if not embed:  # (with files inlined, its line numbers are not bpf/<src>'s)
                reason = reason.replace("/virtual/main.c", f"bpf/{src}")
        details = (f"--- BCC output loading {path} ---\n{log.text.rstrip()}\n"
                   f"--- cflags ---\n{' '.join(cflags)}\n--- BCC said: {one_line(e)}")
        raise ProbeLoadError(f"{what} did not load: {reason}",
                             "run 'otelwater doctor', or add --verbose for BCC's whole output",
                             details=details) from e
