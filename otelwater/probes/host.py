"""Can this host run otelwater's probes? One check per facility, each with the fix.

`checks()` feeds `otelwater doctor`; `require_can_trace()` is what every probe calls first,
so a missing facility is one clear line, before anything is attached.

Privileges are capabilities, not a uid: `AGENT_CAPABILITIES` names the set `otelwater agent`
(and `watch`, `record`) needs as an ordinary user, the one source the systemd unit and the
DaemonSet take theirs from. docs/privileges.md says what each is for, what fails without it
(measured), and what the host must allow.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import struct
import subprocess
from dataclasses import dataclass

from otelwater.errors import EnvironmentProblem, NoBCC, NoBTF, NotRoot


def btf_path() -> str:
    """The kernel BTF to read: OTELWATER_BTF overrides it (a kernel whose BTF lives elsewhere)."""
    return os.environ.get("OTELWATER_BTF", "/sys/kernel/btf/vmlinux")

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
WATER_TRACEPOINTS = ("sock/sk_data_ready", "sock/sock_recv_length", "sock/inet_sock_set_state",
                     "tcp/tcp_destroy_sock", "skb/kfree_skb", "sock/sock_rcvqueue_full")
READ_TRACEPOINTS = ("syscalls/sys_enter_read", "syscalls/sys_exit_read")

# Capability numbers (include/uapi/linux/capability.h)
CAPABILITY_NUMBERS = {"CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19,
                      "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38,
                      "CAP_BPF": 39}
CAP_PERFMON, CAP_BPF, CAP_SYS_ADMIN = (CAPABILITY_NUMBERS[n] for n in
                                      ("CAP_PERFMON", "CAP_BPF", "CAP_SYS_ADMIN"))

# What the agent needs, and nothing more (tests/integration/test_least_privilege.py runs it as
# uid 65534 holding exactly these). CAP_SYS_ADMIN is not among them: nothing it serves needs it.
AGENT_CAPABILITIES = ("CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE")
# What each is for: the doctor's words, and docs/privileges.md's table
CAPABILITY_USES = {
    "CAP_BPF": "create BPF maps and load BPF programs",
    "CAP_PERFMON": "load tracing programs (they read kernel memory: struct sock) and attach "
                   "them to tracepoints",
    "CAP_DAC_READ_SEARCH": "read tracefs (mode 0700: the tracepoints' ids and formats) and "
                           "list other users' /proc/PID/fd",
    "CAP_SYS_PTRACE": "read other users' /proc/PID/fd links (which process holds a socket), "
                      "/proc/PID/exe (the Go binary to trace) and /proc/PID/ns/net",
}
# Capabilities that stand in for one of AGENT_CAPABILITIES in the kernel's own checks
# (bpf_capable(), perfmon_capable(), the DAC override covering read and search)
COVERED_BY = {"CAP_BPF": ("CAP_SYS_ADMIN",), "CAP_PERFMON": ("CAP_SYS_ADMIN",),
              "CAP_DAC_READ_SEARCH": ("CAP_DAC_OVERRIDE",), "CAP_SYS_PTRACE": ()}
# The kernel charges BPF memory to the memory cgroup from Linux 5.11; before, to
# RLIMIT_MEMLOCK, which BCC raises to unlimited: that needs CAP_SYS_RESOURCE (or a unit's
# LimitMEMLOCK=infinity)
MEMCG_ACCOUNTING = (5, 11)
PRIVILEGES_DOC = "docs/privileges.md"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    found: str
    fix: str = ""
    required: bool = True


def parse_caps(status: str, field: str = "CapEff") -> int:
    """A capability set from /proc/PID/status text (`CapEff:\\t000000c000080004`); 0 when absent."""
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    return 0


def _cap_eff() -> int:
    try:
        with open("/proc/self/status") as f:
            return parse_caps(f.read())
    except OSError:
        return 0


def capability_names(caps: int) -> list[str]:
    """The names of the capabilities of CAPABILITY_NUMBERS that `caps` holds, lowest first."""
    return [n for n, bit in sorted(CAPABILITY_NUMBERS.items(), key=lambda kv: kv[1])
            if caps >> bit & 1]


def capability_mask(names) -> int:
    mask = 0
    for n in names:
        mask |= 1 << CAPABILITY_NUMBERS[n]
    return mask


def holds(name: str, caps: int) -> bool:
    """Does `caps` give what `name` gives (itself, or a capability the kernel takes for it)?"""
    return any(caps >> CAPABILITY_NUMBERS[n] & 1 for n in (name, *COVERED_BY.get(name, ())))


def missing_capabilities(caps: int | None = None,
                         wanted: tuple[str, ...] = AGENT_CAPABILITIES) -> list[str]:
    """Which of `wanted` the effective set `caps` (default: this process's) does not give."""
    caps = _cap_eff() if caps is None else caps
    return [n for n in wanted if not holds(n, caps)]


def privileged(caps: int | None = None) -> bool:
    """Can this process load and attach BPF programs? Decided by its effective capabilities,
    not its uid: root with an emptied capability set (a locked-down container) cannot, an
    ordinary user holding AGENT_CAPABILITIES can. Loading needs CAP_BPF and CAP_PERFMON (or
    CAP_SYS_ADMIN, which the kernel takes for both); reading tracefs is checked apart
    (require_can_trace), other users' /proc by the doctor."""
    return not missing_capabilities(caps, ("CAP_BPF", "CAP_PERFMON"))


def _mounted_tracefs() -> str | None:
    """Where tracefs is mounted (from /proc/self/mountinfo), readable or not."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields, _, fs = line.partition(" - ")
                if fs.split()[:1] == ["tracefs"]:
                    path = fields.split()[4].replace("\\040", " ")
                    if path in TRACEFS_CANDIDATES:
                        return path
    except OSError:
        pass
    return None


def tracefs(mount: bool = True) -> str | None:
    """Where tracefs is mounted and readable by this process; mounts it at
    /sys/kernel/tracing if it is not mounted and this process may mount (CAP_SYS_ADMIN)."""
    for p in TRACEFS_CANDIDATES:
        if os.path.isdir(f"{p}/events"):
            return p
    if mount and not _mounted_tracefs() and holds("CAP_SYS_ADMIN", _cap_eff()):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS_CANDIDATES[0]],
                       capture_output=True)
        if os.path.isdir(f"{TRACEFS_CANDIDATES[0]}/events"):
            return TRACEFS_CANDIDATES[0]
    return None


def _tracefs_unreadable() -> str | None:
    """tracefs's mount point when it is mounted but this process cannot read it."""
    where = _mounted_tracefs()
    if where and not os.path.isdir(f"{where}/events"):
        return where
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


def _readable(path: str) -> bool:
    """Can this process open `path` for reading? (os.access judges an ordinary user by its
    uid alone, blind to the capabilities it holds: the open itself says.)"""
    try:
        os.close(os.open(path, os.O_RDONLY))
        return True
    except OSError:
        return False


def headers_present() -> bool:
    """What BCC needs: generated headers under build/, the kernel include tree under source/
    (or both under build/ for a full tree), readable by this process."""
    base = f"/lib/modules/{platform.release()}"
    return os.path.isdir(f"{base}/build/include/generated") and (
        _readable(f"{base}/source/include/linux/kconfig.h")
        or _readable(f"{base}/build/include/linux/kconfig.h"))


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of a kernel release such as 6.18.44-1-cloud-amd64; (0, 0) if unreadable."""
    parts = (release or platform.release()).split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


# The inode of the host's (the initial) pid namespace: a constant of the kernel's
# (PROC_PID_INIT_INO); every other pid namespace gets a dynamic one.
INIT_PID_NS_INO = 0xEFFFFFFC


@dataclass(frozen=True)
class PidNamespace:
    """The pid namespace this process's /proc numbers processes in, when it is not the
    host's (an agent in a pod sharing its pid namespace): the BPF programs then read ids in
    it (bpf/pidns.h), so what they report is what /proc/PID says. net_ino: the network
    namespace of this process, whose sockets alone such an agent watches."""
    dev: int
    ino: int
    net_ino: int

    def cflags(self) -> list[str]:
        return [f"-DOTW_PIDNS_DEV={self.dev}", f"-DOTW_PIDNS_INO={self.ino}",
                f"-DOTW_NETNS_ONLY={self.net_ino}"]


def _nspid_depth(status: str) -> int:
    """How many pid namespaces, from /proc's down to this process's own, number it (the
    NSpid line of /proc/self/status); 1 when the line is missing (kernels before 4.1)."""
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return max(1, len(line.split()) - 1)
    return 1


def pid_namespace(proc: str = "/proc") -> PidNamespace | None:
    """None when /proc numbers processes as the host does (the common case, and a DaemonSet
    with hostPID); else that namespace. /proc's namespace is this process's own when it
    numbers this process once (NSpid); otherwise it is an ancestor's, the one its pid 1
    lives in."""
    try:
        with open(f"{proc}/self/status") as f:
            own = _nspid_depth(f.read()) == 1
        st = os.stat(f"{proc}/self/ns/pid" if own else f"{proc}/1/ns/pid")
        net = os.stat(f"{proc}/self/ns/net").st_ino
    except OSError:
        return None      # no namespace files (a very old kernel): the host's numbering
    if st.st_ino == INIT_PID_NS_INO:
        return None
    return PidNamespace(st.st_dev, st.st_ino, net)


UPROBE_PMU_TYPE = "/sys/bus/event_source/devices/uprobe/type"
PERF_ATTR_SIZE = 128           # PERF_ATTR_SIZE_VER7
NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
PERF_FLAG_FD_CLOEXEC = 8


def uprobes_need_sys_admin() -> bool | None:
    """Does this kernel let only CAP_SYS_ADMIN open uprobes? Linux 6.16 reverted uprobes from
    CAP_PERFMON to CAP_SYS_ADMIN ("perf: Revert to requiring CAP_SYS_ADMIN for uprobes",
    a uprobe in the middle of an instruction corrupts the traced program; the revert went to
    the stable kernels too). Asked of the kernel without placing any uprobe: perf_event_open
    of the uprobe PMU with a path that does not exist fails with EACCES at that check, before
    the path is looked up (ENOENT) when it passes. None: cannot tell (no uprobe PMU, not
    x86-64/arm64, or this process lacks CAP_PERFMON, which the open needs first)."""
    nr = NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None or not holds("CAP_PERFMON", _cap_eff()):
        return None
    try:
        with open(UPROBE_PMU_TYPE) as f:
            pmu_type = int(f.read())
    except (OSError, ValueError):
        return None
    path = ctypes.create_string_buffer(b"/nonexistent/otelwater-doctor-uprobe-check")
    attr = bytearray(PERF_ATTR_SIZE)
    struct.pack_into("<II", attr, 0, pmu_type, PERF_ATTR_SIZE)
    struct.pack_into("<QQ", attr, 56, ctypes.addressof(path), 0)   # uprobe_path, probe_offset
    buf = (ctypes.c_char * PERF_ATTR_SIZE).from_buffer(attr)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), buf, 0, -1, -1, ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd >= 0:    # cannot happen for a missing path; close it all the same
        os.close(fd)
        return False
    err = ctypes.get_errno()
    if err == errno.EACCES:
        return True
    return False if err == errno.ENOENT else None   # ENOENT: past the capability check


def capability_checks(caps: int, euid: int, tracefs_readable: bool = True) -> list[Check]:
    """A summary line (euid, CapEff, the capabilities it holds), then one line per capability
    of AGENT_CAPABILITIES: held (or given by another), or missing with what it is for. Pure:
    `caps` is an effective set (CapEff); tracefs_readable, whether this process reads tracefs
    whatever it holds (root owns it). Every one is required: the agent serves other users'
    processes, which need all four."""
    held = capability_names(caps)
    missing = missing_capabilities(caps)
    grant = ("run as root (sudo), or grant " + ", ".join(missing or AGENT_CAPABILITIES)
             + f" (a systemd unit's AmbientCapabilities=; {PRIVILEGES_DOC})")
    out = [Check("privileges", not missing,
                 f"euid {euid}, CapEff {caps:#x} ({' '.join(held) if held else 'none otelwater uses'})"
                 + (f": lacks {', '.join(missing)}" if missing else ""),
                 grant, required=False)]   # the lines below count, one per capability
    for name in AGENT_CAPABILITIES:
        use = CAPABILITY_USES[name]
        if caps >> CAPABILITY_NUMBERS[name] & 1:
            out.append(Check(name, True, f"held: {use}"))
            continue
        through = [n for n in COVERED_BY[name] if caps >> CAPABILITY_NUMBERS[n] & 1]
        if through:
            out.append(Check(name, True, f"given by {through[0]}: {use}"))
        elif name == "CAP_DAC_READ_SEARCH" and tracefs_readable:
            out.append(Check(name, False, "missing: tracefs is readable all the same, but "
                             "other users' /proc/PID/fd cannot be listed (their sockets' water "
                             f"stays unattributed); needed to {use}",
                             f"grant {name} ({PRIVILEGES_DOC})"))
        else:
            out.append(Check(name, False, f"missing: needed to {use}",
                             f"grant {name} ({PRIVILEGES_DOC})"))
    return out


def memlock_check(caps: int, release: str | None = None) -> Check | None:
    """Before Linux 5.11 a BPF map's memory counts against RLIMIT_MEMLOCK; BCC raises the limit
    to unlimited when a map does not fit, which needs CAP_SYS_RESOURCE, unless the limit is
    unlimited already (a systemd unit's LimitMEMLOCK=infinity). None from 5.11 on."""
    if kernel_version(release) >= MEMCG_ACCOUNTING:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    ok = soft == resource.RLIM_INFINITY or holds("CAP_SYS_RESOURCE", caps)
    return Check("CAP_SYS_RESOURCE (kernels before 5.11)", ok,
                 "held or RLIMIT_MEMLOCK unlimited" if ok else
                 f"missing, and RLIMIT_MEMLOCK is {soft} bytes: BPF maps count against it "
                 "before Linux 5.11",
                 "grant CAP_SYS_RESOURCE, or set LimitMEMLOCK=infinity in the unit "
                 f"(ulimit -l unlimited) ({PRIVILEGES_DOC})")


def checks() -> list[Check]:
    out = []
    caps = _cap_eff()
    unreadable = _tracefs_unreadable()
    out += capability_checks(caps, os.geteuid(), tracefs_readable=not unreadable)
    mem = memlock_check(caps)
    if mem:
        out.append(mem)
    path = btf_path()
    btf = _readable(path)
    out.append(Check("kernel BTF", btf, path if btf else f"{path} missing or unreadable",
                     "use a kernel built with CONFIG_DEBUG_INFO_BTF=y"))
    tfs = tracefs()
    st = None
    if unreadable and not tfs:
        try:
            st = os.stat(unreadable)
        except OSError as e:   # listed in mountinfo, not reachable here (another mount view)
            out.append(Check("tracefs", False, f"mounted at {unreadable} but not reachable "
                             f"here ({e.strerror})", "mount tracefs at /sys/kernel/tracing "
                             "in this mount namespace (a container: mount the host's, "
                             "read-only)"))
    if st is not None:
        out.append(Check("tracefs", False, f"mounted at {unreadable}, not readable by this "
                         f"process (mode {st.st_mode & 0o777:04o}, uid {st.st_uid})",
                         f"grant CAP_DAC_READ_SEARCH ({PRIVILEGES_DOC})"))
    elif not (unreadable and not tfs):
        out.append(Check("tracefs", bool(tfs), tfs or "not mounted",
                         "mount -t tracefs tracefs /sys/kernel/tracing (as root; systemd "
                         "mounts it at boot)"))
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
    lock = lockdown()
    if lock == "confidentiality":
        out.append(Check("kernel lockdown", False, "confidentiality: BPF may not read kernel "
                         "memory (bpf_probe_read_kernel)",
                         "boot with lockdown=integrity or none (the probes read struct sock)"))
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
                     hd if ok else f"{hd} missing or unreadable",
                     "apt-get install linux-headers-amd64 and link them: scripts/setup.sh does "
                     "(offsets come from BTF, so any version compiles); an ordinary user "
                     "needs them world-readable (Debian's are)"))
    up = os.path.isdir("/sys/bus/event_source/devices/uprobe")
    if not up:
        out.append(Check("uprobes", False, "no uprobe PMU",
                         "kernel needs CONFIG_UPROBES=y (only --probes uprobe needs it)",
                         required=False))
    elif holds("CAP_SYS_ADMIN", caps):
        out.append(Check("uprobes", True, "uprobe PMU present", required=False))
    elif uprobes_need_sys_admin():
        out.append(Check("uprobes", False, "this kernel opens uprobes for CAP_SYS_ADMIN only "
                         "(Linux 6.16, and the stable kernels that took the change): --probes "
                         "uprobe cannot attach; the default tracepoint sampler needs none",
                         "leave --probes at tracepoint (the agent's default), or grant "
                         f"CAP_SYS_ADMIN for --probes uprobe ({PRIVILEGES_DOC})",
                         required=False))
    else:
        out.append(Check("uprobes", True, "uprobe PMU present", required=False))
    ns = pid_namespace()
    out.append(Check("pid namespace", True, "the host's: every process and socket of the host "
                     "can be traced" if ns is None else
                     f"not the host's (inode {ns.ino}: a pod's or a container's): processes "
                     f"are traced as this /proc numbers them, and only the sockets of this "
                     f"network namespace (inode {ns.net_ino}) are watched", required=False))
    kp = os.path.isdir("/sys/bus/event_source/devices/kprobe")
    out.append(Check("kprobes", kp, "present" if kp else "absent (not needed)", required=False))
    return out


def lockdown() -> str | None:
    """The kernel lockdown mode in force (none, integrity, confidentiality), None if unknown."""
    try:
        with open("/sys/kernel/security/lockdown") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def not_privileged_error(caps: int, euid: int) -> NotRoot:
    """The one line for a process that cannot load BPF programs: what it lacks, by name."""
    lacks = missing_capabilities(caps, ("CAP_BPF", "CAP_PERFMON"))
    return NotRoot(f"loading eBPF programs needs CAP_BPF and CAP_PERFMON, and this process "
                   f"(euid {euid}) lacks {' and '.join(lacks)}",
                   ("run as root (sudo), or grant " if euid else "grant this root process ")
                   + ", ".join(AGENT_CAPABILITIES[:-1]) + f" and {AGENT_CAPABILITIES[-1]} "
                   f"({PRIVILEGES_DOC})")


def require_can_trace() -> None:
    """Raise the first blocking problem as one line; mount tracefs on the way if needed."""
    caps = _cap_eff()
    if not privileged(caps):
        raise not_privileged_error(caps, os.geteuid())
    if not _readable(btf_path()):
        raise NoBTF(f"kernel BTF ({btf_path()}) is missing",
                    "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    if not tracefs():
        where = _tracefs_unreadable()
        if where:
            raise EnvironmentProblem(f"tracefs ({where}) is not readable by this process "
                                     f"(euid {os.geteuid()}) and it lacks CAP_DAC_READ_SEARCH",
                                     f"grant CAP_DAC_READ_SEARCH ({PRIVILEGES_DOC})")
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
