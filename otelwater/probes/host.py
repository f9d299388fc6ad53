"""Can this host run otelwater's probes? One check per facility, each with the fix.

`checks()` feeds `otelwater doctor`; `require_can_trace()` is what every probe calls first,
so a missing facility is one clear line, before anything is attached.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass

from otelwater.errors import EnvironmentProblem, NoBCC, NoBTF, NotRoot



def btf_path() -> str:
    """The kernel BTF to read: OTELWATER_BTF overrides it (a kernel whose BTF lives elsewhere)."""
    return os.environ.get("OTELWATER_BTF", "/sys/kernel/btf/vmlinux")

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
CAP_PERFMON, CAP_BPF, CAP_SYS_ADMIN = 38, 39, 21
WATER_TRACEPOINTS = ("sock/sk_data_ready", "sock/sock_recv_length", "sock/inet_sock_set_state",
                     "tcp/tcp_destroy_sock", "skb/kfree_skb", "sock/sock_rcvqueue_full")
READ_TRACEPOINTS = ("syscalls/sys_enter_read", "syscalls/sys_exit_read")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    found: str
    fix: str = ""
    required: bool = True


def _cap_eff() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def privileged() -> bool:
    """Can this process load and attach BPF programs? Decided by its effective capabilities,
    not its uid: root with an emptied capability set (a locked-down container) cannot."""
    caps = _cap_eff()
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    return has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))


def tracefs(mount: bool = True) -> str | None:
    """Where tracefs is mounted; mounts it at /sys/kernel/tracing if it can."""
    for p in TRACEFS_CANDIDATES:
        if os.path.isdir(f"{p}/events"):
            return p
    if mount and privileged():
        subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS_CANDIDATES[0]],
                       capture_output=True)
        if os.path.isdir(f"{TRACEFS_CANDIDATES[0]}/events"):
            return TRACEFS_CANDIDATES[0]
    return None


def tracepoint_exists(name: str) -> bool:
    root = tracefs()
    return bool(root) and os.path.isdir(f"{root}/events/{name}")


def kfree_skb_has_rx_sk() -> bool:
    root = tracefs()
    try:
        with open(f"{root}/events/skb/kfree_skb/format") as f:
            return "rx_sk" in f.read()
    except (OSError, TypeError):
        return False


def headers_dir() -> str:
    return f"/lib/modules/{platform.release()}/build"


def headers_present() -> bool:
    """What BCC needs: generated headers under build/, the kernel include tree under source/
    (or both under build/ for a full tree)."""
    base = f"/lib/modules/{platform.release()}"
    return os.path.isdir(f"{base}/build/include/generated") and (
        os.path.exists(f"{base}/source/include/linux/kconfig.h")
        or os.path.exists(f"{base}/build/include/linux/kconfig.h"))


def checks() -> list[Check]:
    out = []
    priv = privileged()
    out.append(Check("privileges", priv, f"euid {os.geteuid()}, CapEff {_cap_eff():#x}",
                     "run as root, or grant CAP_BPF and CAP_PERFMON (sudo otelwater ...)"))
    path = btf_path()
    btf = os.access(path, os.R_OK)
    out.append(Check("kernel BTF", btf, path if btf else f"{path} missing or unreadable",
                     "use a kernel built with CONFIG_DEBUG_INFO_BTF=y"))
    tfs = tracefs()
    out.append(Check("tracefs", bool(tfs), tfs or "not mounted",
                     "mount -t tracefs tracefs /sys/kernel/tracing"))
    if tfs:
        missing = [t for t in WATER_TRACEPOINTS + READ_TRACEPOINTS if not tracepoint_exists(t)]
        out.append(Check("tracepoints", not missing,
                         "all present" if not missing else "missing: " + ", ".join(missing),
                         "needs Linux 6.x with sock:sk_data_ready and sock:sock_recv_length"))
        rx = kfree_skb_has_rx_sk()
        out.append(Check("drop attribution", rx,
                         "skb:kfree_skb carries rx_sk" if rx else "skb:kfree_skb has no rx_sk",
                         "Linux 6.9+ attributes drops to sockets; older kernels count "
                         "sock_rcvqueue_full only", required=False))
    try:
        import bcc  # noqa: F401
        out.append(Check("BCC", True, f"bcc {getattr(bcc, '__version__', '?')}"))
    except ImportError:
        out.append(Check("BCC", False, "python module 'bcc' not importable",
                         "apt-get install python3-bpfcc; use a venv made with "
                         "--system-site-packages from /usr/bin/python3 (scripts/setup.sh)"))
    hd = headers_dir()
    ok = headers_present()
    out.append(Check("kernel headers (BCC compiles against them)", ok,
                     hd if ok else f"{hd} missing",
                     "apt-get install linux-headers-amd64 and link them: scripts/setup.sh does "
                     "(offsets come from BTF, so any version compiles)"))
    up = os.path.isdir("/sys/bus/event_source/devices/uprobe")
    out.append(Check("uprobes", up, "uprobe PMU present" if up else "no uprobe PMU",
                     "kernel needs CONFIG_UPROBES=y (only --probes uprobe needs it)",
                     required=False))
    kp = os.path.isdir("/sys/bus/event_source/devices/kprobe")
    out.append(Check("kprobes", kp, "present" if kp else "absent (not needed)", required=False))
    return out


def require_can_trace() -> None:
    """Raise the first blocking problem as one line; mount tracefs on the way if needed."""
    if not privileged():
        raise NotRoot("loading eBPF programs needs root or CAP_BPF+CAP_PERFMON",
                      "run with sudo")
    if not os.access(btf_path(), os.R_OK):
        raise NoBTF(f"kernel BTF ({btf_path()}) is missing",
                    "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    if not tracefs():
        raise EnvironmentProblem("tracefs is not mounted and could not be mounted",
                                 "mount -t tracefs tracefs /sys/kernel/tracing")
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        raise NoBCC("BCC's Python module is not importable",
                    "apt-get install python3-bpfcc, then use scripts/setup.sh's .venv") from e
    if not headers_present():
        raise EnvironmentProblem(f"no kernel headers at {headers_dir()} for BCC to compile with",
                                 "run scripts/setup.sh (installs and links linux-headers-amd64)")
