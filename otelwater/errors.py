"""Errors that reach the user as one line and an exit code.

    OtelwaterError                 exit 1   base: message names the problem and the fix
    ├── UsageError                 exit 2   bad flags or values (click's convention)
    ├── EnvironmentProblem         exit 3   the host cannot run the probes
    │   ├── NotRoot                         no root / CAP_BPF+CAP_PERFMON
    │   ├── NoBTF                           /sys/kernel/btf/vmlinux missing or unreadable
    │   ├── NoBCC                           python3-bpfcc missing
    │   └── ProbeLoadError                  the kernel refused a program or an attach
    ├── TargetError                exit 4   what the user pointed at is not usable
    │   ├── NoSuchProcess                   --pid / --go-pid names no live process
    │   └── BinaryError                     not an ELF, not x86-64, not Go, no net.(*conn).Read
    ├── OutputFailed               exit 1   an output that cannot be written (a full disk)
    ├── RecordingError             exit 5   a malformed recording / input file
    └── ExportFailed               exit 6   an offline re-export that was not delivered

Every command catches OtelwaterError in cli.py, prints ``otelwater: <message>; <fix>`` to stderr
and exits with the class's code: no traceback for anything the user can fix. ``details`` holds
what only `--verbose` prints (a compiler or verifier log, the cflags), before that line.
Anything else that escapes a command is a bug: one line naming it and where to report it,
exit 1 (the traceback with OTELWATER_DEBUG=1 or --verbose).
"""

from __future__ import annotations

import errno


class OtelwaterError(Exception):
    exit_code = 1

    def __init__(self, message: str, fix: str | None = None, *, details: str | None = None):
        self.message = message
        self.fix = fix
        self.details = details
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


class UsageError(OtelwaterError):
    exit_code = 2


class EnvironmentProblem(OtelwaterError):
    exit_code = 3


class NotRoot(EnvironmentProblem):
    pass


class NoBTF(EnvironmentProblem):
    pass


class NoBCC(EnvironmentProblem):
    pass


class ProbeLoadError(EnvironmentProblem):
    pass


class TargetError(OtelwaterError):
    exit_code = 4


class NoSuchProcess(TargetError):
    pass


class BinaryError(TargetError):
    pass


class RecordingError(OtelwaterError):
    exit_code = 5


class ExportFailed(OtelwaterError):
    exit_code = 6


class OutputFailed(OtelwaterError):
    """An output that cannot be written: stdout or a file behind it on a full disk, over a
    quota, an I/O error. Exit 1 (README: an output that cannot be written)."""

    @classmethod
    def writing(cls, what: str, e: OSError) -> "OutputFailed":
        """`what`: the output, e.g. "the JSON Lines output"; `e`: the write's error."""
        code = errno.errorcode.get(e.errno or 0)
        cause = (e.strerror or str(e)) + (f" ({code})" if code else "")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space, or send the output elsewhere"
        elif e.errno == errno.EFBIG:
            fix = "send the output to a filesystem that takes larger files, or elsewhere"
        else:
            fix = "send the output elsewhere (another file or a pipe)"
        return cls(f"cannot write {what}: {cause}", fix)
