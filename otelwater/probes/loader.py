"""What every otelwater BPF program needs to be built and loaded, in one place: the running
kernel's offsets as -D flags, the ring-buffer size check, and BCC's compile/load failures
turned into one-line ProbeLoadErrors. Used by the water probe and both Go read samplers.

BCC writes clang's diagnostics and the verifier's log straight to file descriptor 2, so a load
runs with fd 2 captured: on failure the error line quotes the first compiler error and
`details` (printed by --verbose) holds the whole log and the cflags; on success the log (clang
warnings) is dropped. LLVM ends the process with exit(1) on some errors (the BPF stack limit,
for one) without returning to Python: a C-level exit hook then puts fd 2 back and says the
first error, so that failure is one line too, never silence."""

from __future__ import annotations

import contextlib
import ctypes
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


# Each probe's poll() takes at most this many ring-buffer records and runs at most this long,
# so the caller's loop (sweeps, the view, export) stays on time under a flood; the rest waits
# in the ring buffer for the next poll.
POLL_BUDGET = 2048
POLL_TIME_S = 0.05
# After detaching, a program already running finishes (microseconds) before the final counts.
STOP_SETTLE_S = 0.02
# At the end, what the ring buffers still hold is decoded for at most this long; the rest is
# counted as lost (without decoding) so Ctrl-C stays prompt with a huge ring buffer.
STOP_DRAIN_S = 1.0

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# A BPF ring buffer's size (max_entries, u32) must be a power of two and a page multiple.
MAX_RINGBUF_PAGES = (1 << 31) // PAGE_SIZE


def check_ringbuf_pages(pages: int) -> None:
    if not 1 <= pages <= MAX_RINGBUF_PAGES or pages & (pages - 1):
        raise UsageError(f"ring buffer pages must be a power of two from 1 to "
                         f"{MAX_RINGBUF_PAGES} ({MAX_RINGBUF_PAGES * PAGE_SIZE >> 30} GiB, the "
                         f"kernel's limit), got {pages}", "e.g. --ringbuf-pages 64 (the default), 128, 256")


def kernel_cflags(offsets: dict[str, int], ringbuf_pages: int,
                  ring: str = "OTW_RINGBUF_PAGES") -> list[str]:
    """The include path, every BTF offset as -D, the ring buffer size as `ring` (each
    ring buffer has its own macro: the Go read sampler's is compiled into the water probe's
    program beside the water probe's own), and the pid namespace when /proc's is not the
    host's (host.pid_namespace)."""
    check_ringbuf_pages(ringbuf_pages)
    flags = [f"-I{BPF_DIR}"]
    flags += [f"-D{k}={v}" for k, v in sorted(offsets.items())]
    flags.append(f"-D{ring}={ringbuf_pages}")
    pidns = host.pid_namespace()
    if pidns:       # in a pod: its ids and its sockets (bpf/pidns.h)
        flags += pidns.cflags()
    return flags


def merge_cflags(flags: list[str], more: list[str]) -> list[str]:
    """flags + the ones of `more` not already there; a macro both define differently is a
    bug (clang would take the last silently: a sampler's setting overriding the probe's)."""
    def macro(f):
        return f[2:].split("=", 1)[0] if f.startswith("-D") else None

    have = {macro(f): f for f in flags if macro(f)}
    out = list(flags)
    for f in more:
        m = macro(f)
        if m in have and have[m] != f:
            raise ProbeLoadError(f"the embedded program redefines {m} ({have[m]} vs {f})",
                                 "an otelwater bug: please report it")
        if f not in out:
            out.append(f)
    return out


class RingBuffer:
    """One BPF ring buffer with a libbpf consumer of its own.

    BCC keeps every ring buffer of a program in one consumer, and its consume goes through
    them in order and stops at the first callback that returns < 0, which is how a poll keeps
    to its budget: with the Go read sampler compiled into the water probe's program, a
    flooded water ring buffer (--follow) ended every consume before the read sampler's, which
    then was never read (every read lost or left in it). So each probe consumes its own.
    `callback(ctx, data, size)` returns < 0 to stop this consume after the record."""

    def __init__(self, bpf, name: str, callback):
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib

        self._lib = lib
        self._counting: list | None = None    # count_rest(): [count, first ts, last ts, at]
        u64 = ctypes.c_uint64.from_address

        def on_record(ctx, data, size):
            c = self._counting
            if c is None:
                return int(callback(ctx, data, size) or 0)
            ts = u64(data + c[3]).value      # count only: no decoding, about 1 us a record
            if not c[0]:
                c[1] = ts
            c[0] += 1
            if ts > c[2]:
                c[2] = ts
            return 0

        self._fn = _RINGBUF_CB_TYPE(on_record)   # kept referenced while libbpf may call it
        try:
            fd = bpf[name].map_fd
        except Exception as e:  # noqa: BLE001 - BCC raises bare exceptions for maps
            raise ProbeLoadError(f"cannot open the ring buffer {name}: {one_line(e)}") from e
        self._mgr = lib.bpf_new_ringbuf(fd, self._fn, None)
        if not self._mgr:
            raise ProbeLoadError(f"cannot open the ring buffer {name}",
                                 "run 'otelwater doctor'")

    def consume(self) -> None:
        """What the ring buffer holds now (never blocks), until a callback says stop."""
        if self._mgr:
            self._lib.bpf_consume_ringbuf(self._mgr)

    def count_rest(self, ts_offset: int) -> tuple[int, int, int]:
        """Empty the ring buffer without decoding: (records, the first's and the latest's
        u64 time at `ts_offset` in the record)."""
        self._counting = c = [0, 0, 0, ts_offset]
        try:
            self.consume()
        finally:
            self._counting = None
        return c[0], c[1], c[2]

    def close(self) -> None:
        if self._mgr:
            self._lib.bpf_free_ringbuf(self._mgr)
            self._mgr = None


def detach_all(b) -> None:
    """Detach every program of BCC object `b` from its attach points (tracepoints, raw
    tracepoints, uprobes), keeping its maps: its ring buffers and counters stay readable, and
    nothing adds to them any more (wait STOP_SETTLE_S for a program that was running).
    BPF.cleanup() does the rest."""
    for k in list(b.uprobe_fds):
        b.detach_uprobe_event(k)
    for k in list(b.tracepoint_fds):
        b.detach_tracepoint(k)
    for k in list(b.raw_tracepoint_fds):
        b.detach_raw_tracepoint(k)


def running_kernel_btf():
    """The running kernel's BTF (or OTELWATER_BTF's), after the host checks."""
    host.require_can_trace()
    from otelwater.probes.btf import Btf

    return Btf.load(host.btf_path())


# (saved fd 2, the capture file) while a capture runs: what the C-level exit hook restores
_capturing: list[tuple[int, object]] = []


def _say_on_c_exit() -> None:
    """Run by libc's exit() (LLVM's fatal errors call it from inside BPF()): the capture would
    otherwise swallow the only words about why the process ends."""
    if not _capturing:
        return
    saved, tmp = _capturing[-1]
    try:
        os.dup2(saved, 2)
        tmp.seek(0)
        log = tmp.read().decode(errors="replace")
        reason = first_error(log) or (log.strip().splitlines() or ["no output"])[-1]
        os.write(2, (f"otelwater: the BPF program did not compile: {reason.strip()}\n"
                     "  (an otelwater bug on this kernel or clang: please report it with "
                     "--verbose's output)\n").encode())
    except Exception:  # noqa: BLE001 - the process is ending; say nothing rather than crash
        pass


_EXIT_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _arg: _say_on_c_exit())


@contextlib.contextmanager
def _c_exit_hook():
    """_say_on_c_exit registered with libc's exit handlers for the duration only: registered
    under a token of our own (as a shared object's handlers are) and, at the end, run once and
    removed by __cxa_finalize(token). It must not outlive the block: at a normal exit the
    interpreter is gone before libc runs its handlers, and calling into it then crashes."""
    token = ctypes.create_string_buffer(1)
    try:
        libc = ctypes.CDLL(None)
        libc.__cxa_atexit.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        libc.__cxa_finalize.argtypes = [ctypes.c_void_p]
        hook = ctypes.cast(_EXIT_HOOK, ctypes.c_void_p)
        ok = libc.__cxa_atexit(hook, None, ctypes.addressof(token)) == 0
    except (OSError, AttributeError):   # not glibc: no hook, the capture works all the same
        ok = False
    try:
        yield
    finally:
        if ok:
            libc.__cxa_finalize(ctypes.addressof(token))


@contextlib.contextmanager
def captured_stderr_fd():
    """Everything written to file descriptor 2 meanwhile (by C code too), as .text after."""
    class Log:
        text = ""

    log = Log()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with _scratch_file() as tmp, _c_exit_hook():
            os.dup2(tmp.fileno(), 2)
            _capturing.append((saved, tmp))
            try:
                yield log
            finally:
                _capturing.pop()
                sys.stderr.flush()
                os.dup2(saved, 2)
                tmp.seek(0)
                log.text = tmp.read().decode(errors="replace")
    finally:
        os.close(saved)


def _scratch_file():
    """An anonymous file in memory (memfd: no writable directory needed, the agent's root file
    system may be read-only), else a temporary file."""
    try:
        return os.fdopen(os.memfd_create("otelwater-bcc-log", os.MFD_CLOEXEC), "w+b")
    except (AttributeError, OSError):
        return tempfile.TemporaryFile()


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


# Direct reads of struct sock and tcp_sock (bpf/water.c, otw_refresh), through the kfunc
# bpf_rdonly_cast: the struct fields each arrival and read reads, as the C program loads them.
DIRECT_READ_FIELDS = (("OTW_BTF_SOCK", "OFF_SK_RCVQ_QLEN"), ("OTW_BTF_SOCK", "OFF_SK_RMEM_ALLOC"),
                      ("OTW_BTF_SOCK", "OFF_SK_BACKLOG_LEN"), ("OTW_BTF_SOCK", "OFF_SK_RCVBUF"),
                      ("OTW_BTF_SOCK", "OFF_SK_DROPS"), ("OTW_BTF_TCP_SOCK", "OFF_TCP_RCV_NXT"),
                      ("OTW_BTF_TCP_SOCK", "OFF_TCP_COPIED_SEQ"))
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
_direct_read: dict[tuple, list[str]] = {}
direct_read_note = ""   # why direct reads are off, when they are (not shown yet: for doctor)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    import struct

    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def direct_read_cflags(cflags: list[str]) -> list[str]:
    """-D flags that let bpf/water.c load struct sock and tcp_sock fields directly instead of
    with bpf_probe_read_kernel (helper calls: ~115 ns an event for the two on the test
    machine): the BTF ids of the kfunc bpf_rdonly_cast and of the two structs, once a raw
    tracepoint program that casts with it and loads each field (at the offsets in `cflags`)
    has passed this kernel's verifier (6.2+ with the JIT; root). Otherwise
    OTW_KF_RDONLY_CAST=0: probe reads, as before. The test program (31 instructions, never
    attached) loads once per process and set of offsets; any failure means probe reads."""
    global direct_read_note
    offs = {}
    for f in cflags:
        if f.startswith("-DOFF_") and "=" in f:
            k, v = f[2:].split("=", 1)
            offs[k] = v
    if any(f.startswith("-DOTW_KF_RDONLY_CAST=") for f in cflags):
        return []   # decided by the caller
    need = sorted({off for _s, off in DIRECT_READ_FIELDS})
    if any(o not in offs for o in need):
        return []   # not a program that reads sockets
    key = tuple(offs[o] for o in need)
    if key in _direct_read:
        return _direct_read[key]
    off = ["-DOTW_KF_RDONLY_CAST=0"]
    try:
        from otelwater.probes.btf import BtfError

        btf = running_kernel_btf()
        try:
            ids = {"OTW_KF_RDONLY_CAST": btf.func_id("bpf_rdonly_cast"),
                   "OTW_BTF_SOCK": btf.type_id("struct sock"),
                   "OTW_BTF_TCP_SOCK": btf.type_id("struct tcp_sock")}
        except BtfError as e:
            direct_read_note = f"no kfunc bpf_rdonly_cast in BTF ({e})"
            _direct_read[key] = off
            return off
        prog = _insn(0x79, 6, 1)                    # r6 = ctx->args[0]
        for struct_macro, off_macro in DIRECT_READ_FIELDS:
            prog += _insn(0xbf, 1, 6)               # r1 = r6
            prog += _insn(0xb7, 2, imm=ids[struct_macro])   # r2 = the struct's BTF id
            prog += _insn(0x85, 0, 2, imm=ids["OTW_KF_RDONLY_CAST"])  # call the kfunc
            prog += _insn(0x61, 0, 0, off=int(offs[off_macro], 0))    # r0 = *(u32 *)(r0 + off)
        prog += _insn(0xb7, 0) + _insn(0x95)        # return 0
        libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
        libbpf.bpf_prog_load.restype = ctypes.c_int
        libbpf.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                         ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
        fd = libbpf.bpf_prog_load(BPF_PROG_TYPE_RAW_TRACEPOINT, b"otw_direct_read", b"GPL",
                                  prog, len(prog) // 8, None)
        if fd < 0:
            direct_read_note = (f"the verifier refused a direct read "
                                f"({os.strerror(-fd)})")
            _direct_read[key] = off
            return off
        os.close(fd)
    except Exception as e:  # probe reads are always a safe answer: never fail a load here
        direct_read_note = f"direct reads not tested ({one_line(e)})"
        _direct_read[key] = off
        return off
    direct_read_note = ""
    _direct_read[key] = [f"-D{k}={v}" for k, v in ids.items()]
    return _direct_read[key]


def _direct_on(flags: list[str]) -> bool:
    return any(f.startswith("-DOTW_KF_RDONLY_CAST=") and not f.endswith("=0") for f in flags)


def load_bpf(src: str, cflags: list[str], what: str, embed: tuple[str, ...] = ()):
    """Compile and load bpf/<src> (with the files of `embed` inlined: main_source) with BCC;
    any failure is one ProbeLoadError line whose details (printed by --verbose) are BCC's
    whole output and the cflags."""
    from bcc import BPF  # host.require_can_trace() has checked that it imports

    path = BPF_DIR / src
    direct = direct_read_cflags(cflags)
    base = list(cflags)
    cflags = base + direct

    def build(flags: list[str]):
        if embed:
            return BPF(text=main_source(src, embed), cflags=flags)
        return BPF(src_file=str(path), cflags=flags)

    try:
        with captured_stderr_fd() as log:
            try:
                return build(cflags)
            except Exception as e:  # noqa: BLE001
                if not (_direct_on(direct) and "Failed to load BPF program" in str(e)):
                    raise
                # The direct reads' kfunc call is inline asm whose scratch registers (r0-r5)
                # BCC's front end cannot name as clobbered: the compiler may keep a value in
                # one across the call, and the verifier then refuses the program (R3 !read_ok
                # with --cgroup here). It refuses, so nothing wrong ever runs: the same
                # program with probe reads instead.
                cflags = base + ["-DOTW_KF_RDONLY_CAST=0"]
                return build(cflags)
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


# BCC's compiler, in this process, and the disassembler (used again only when a new Go binary
# is traced: its pages come back then)
COMPILER_LIBRARIES = ("libLLVM", "libclang", "libcapstone")
MADV_DONTNEED = 4


def release_compiler_memory() -> int:
    """After the programs are loaded: give back what compiling them left in this process, for
    a long run (the agent). A compile touches ~80 MB of LLVM's and clang's code, counted in the
    resident set until the kernel reclaims it: their read-only pages are dropped from this
    process (madvise DONTNEED: they come back from the file if they are ever run again; a
    mapping with a page of its own, the libraries' state or relocated data made read-only
    after relocation (RELRO), is never touched), and the heap the compile freed
    goes back to the system (malloc_trim). Returns the bytes of mappings dropped."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    dropped = 0
    for lo, hi in _clean_compiler_mappings():
        if libc.madvise(lo, hi - lo, MADV_DONTNEED) == 0:
            dropped += hi - lo
    trim_heap()
    return dropped


def bound_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads malloc arenas of their own (up to 8 per CPU), and what a thread
    freed stays in its arena for the next one. The agent's threads (export, metric readers,
    the endpoint, one per service's last export) would each keep an arena's worth: with
    10,000 watched sockets the agent settled at 171 MiB with glibc's default and 144 MiB with
    two arenas, and the soak (bench/agent_soak.py) grew ~14 MiB per 100 restarts of the
    traced service with the default and stayed flat with two. The same as MALLOC_ARENA_MAX=2,
    which takes precedence when set. A libc other than glibc: nothing to do."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        ctypes.CDLL(None).mallopt(-8, arenas)       # M_ARENA_MAX (malloc.h)
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Give the free pages of the C heap back to the system (glibc's malloc_trim(0), which
    also releases free pages inside the heap and the threads' arenas, not only its top). The
    agent does it after the load and then every TRIM_EVERY_S (2 s): each sweep and export
    frees what it allocated, but glibc keeps freed pages until told. With 10,000 sockets the
    agent's highest RSS in a 15-s window was 153 MiB trimming every 10 s and 140 every 2 s,
    its CPU the same (bench/README.md). ~8 ms a trim of a fragmented heap; no-op elsewhere."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):   # not glibc
        pass


def _clean_compiler_mappings() -> list[tuple[int, int]]:
    """(start, end) of the compiler libraries' read-only mappings whose every resident page is
    the file's (no anonymous, i.e. copied-on-write, page): /proc/self/smaps."""
    out: list[tuple[int, int]] = []
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return out
    current = None
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
            current = None
            if len(head) == 6 and "w" not in head[1] and head[1].endswith("p") and \
                    os.path.basename(head[5]).startswith(COMPILER_LIBRARIES):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                current = [lo, hi, True]
                out.append(current)
        elif current is not None and line.startswith(("Anonymous:", "Private_Dirty:")):
            if int(line.split()[1]) != 0:
                current[2] = False
    return [(lo, hi) for lo, hi, clean in out if clean]

