"""Standing water at start: sockets that already hold unread data when otelwater attaches.

The kernel probe learns of a socket from its first event (an arrival, a read, a drop, a state
change). A socket whose reader is stuck, holding 50 KB while nothing moves, makes no event, so
the probe would never report it: the case people reach for this tool in. `StandingWater` seeds
those from the kernel's socket table through sock_diag (the interface `ss` uses), in user
space, with the probe's own filters:

    sw = StandingWater(ports=frozenset({8080}))
    snaps = sw.scan(time.monotonic_ns())          # at start: every socket holding water
    ...
    snaps = sw.sweep(now_ns, quiet_keys)          # every interval: those the probe did not see
                                                  # whose water changed, or once a heartbeat

Re-reports. A standing socket is still water nobody reads, and its figures stay the same while
nothing moves: saying it again every sweep said nothing new (2,000 idle connections holding
bytes made 60,000 of the lines of a 30 s run). `sweep` reports a quiet standing socket when its
water or state changed since it was last reported (level, volume, unread bytes, capacity,
backlog, drops, TCP state: `water_of`), and otherwise once every `heartbeat_s` (60 s: well
inside the 600 s after which the alert stage and the metric series forget a silent socket),
so a consumer that starts reading late still learns of it within a heartbeat. A socket the probe
has seen is the probe's to report; if it is ever quiet again it is reported at once.

What one dump gives (IPv4 and IPv6 TCP, every state that can hold unread bytes: not LISTEN,
whose rqueue is the accept backlog, nor SYN_SENT/SYN_RECV, where SIOCINQ is 0 by definition,
nor TIME_WAIT, which has no receive queue), mapped onto WaterSnapshot (trigger "standing"):
    unread_bytes  idiag_rqueue = rcv_nxt - copied_seq, less the one sequence number of a FIN
                  that arrived and is still unread (CLOSE_WAIT, LAST_ACK, CLOSING): exactly
                  SIOCINQ, which tests/integration/test_sockdiag.py checks, FIN included
    volume        SK_MEMINFO_RMEM_ALLOC (ss -tm "r")      capacity  SK_MEMINFO_RCVBUF ("rb")
    drops         SK_MEMINFO_DROPS ("d")                  backlog   SK_MEMINFO_BACKLOG ("bl")
    level         0: sock_diag does not say sk_receive_queue.qlen (0 here means unknown; the
                  first kernel event on the socket gives the real level)
    bytes_arrived, bytes_read   0: they are rcv_nxt/copied_seq (sequence numbers), which
                  sock_diag does not give; tcp_info's tcpi_bytes_received counts from the
                  peer's initial sequence number, so it would not line up with the kernel's
    pid, comm     the process holding the socket's inode (/proc/*/fd, as `ss -p`); tid 0
    sock_key      otelwater.sockkey over the socket's network namespace, as the kernel's
Only sockets with unread_bytes > 0 are reported.

Other network namespaces (otelwater as a sidecar or a DaemonSet agent, beside the service, not
in its namespace). sock_diag answers only for the namespace of the netlink socket that asks, and
joining another one (setns) takes CAP_SYS_ADMIN, which otelwater does without. So sock_diag
dumps our own namespace, and another namespace is read from /proc/PID/net/tcp{,6} of a process
in it (otelwater.hostsockets): its addresses, state, inode and rx_queue (the same
rcv_nxt - copied_seq as idiag_rqueue), the key over that namespace's inode, which is the one the
kernel takes from sk->sk_net. The rest of what sock_diag says (volume, capacity, backlog, drops,
the last arrival) is read from the socket itself on a copy of its holder's fd (pidfd_getfd:
ptrace access, i.e. CAP_SYS_PTRACE, one of the agent's capabilities; Linux 5.6), with SIOCINQ
for the unread bytes; where that is refused they are 0 (unknown, as the level is) and the
unread bytes come from rx_queue. Which namespaces: with a pid or cgroup filter, those of the
processes holding the sockets it keeps (our own dumped only if one of them is in it); without,
ours and every other one on the host (looked up at the scan and every NAMESPACES_S).
tests/integration/test_namespaces.py checks it against `ss` run inside the namespace.

Filters, as the kernel probe's: `ports` (local or remote port), `pids` (the socket's inode is
one of the pids' socket inodes), `cgroups` (cgroup v2 directories: the pids in each one's
cgroup.procs, then their inodes); each given filter must pass.

Cost. Decoding every sock_diag message with pyroute2 (DiagSocket.get_sock_stats) costs
50-180 µs of CPU per socket here, idle or not. So the dump reads the kernel's replies itself
(a plain AF_NETLINK socket) and looks at each message's idiag_rqueue, ports and inode at their
fixed offsets in struct inet_diag_msg; only messages that pass (sockets holding water) are
decoded by pyroute2's inet_diag_msg. Measured on this 2-core VM, 2,000 idle loopback sockets
(1,000 pairs held by one process): 3.0-4.0 µs of CPU per socket per dump,
kernel side included (thread_time around the dump: the netlink dump runs in our recvmsg),
i.e. 7-8 ms a dump; 8,000 sockets: 3.0-3.2 µs, 25 ms. The first scan also walks /proc/*/fd
once for the owners (30-130 ms with this process holding those 2,000-8,000 fds), and
importing pyroute2 takes ~0.2 s, paid once in the constructor. `sweep` measures each dump's
CPU time and re-dumps at most every `min_gap_s = max(floor_s, cost / 0.10)`, so the dumps stay
under 10% of one CPU however many sockets the host has (with the 1 s floor, the gap starts to
grow past ~28,000 sockets). Another namespace costs a read of its two tables, in which the
kernel walks the host's whole TCP hash table (262,144 buckets here, 2,400 sockets: 2.5 ms a
table, where sock_diag's dump of both families took 2.7 ms), then only rows holding water are
split and decoded, and each such socket's figures read on its fd (~12 µs). With one namespace,
ours, a dump costs what it did: without a filter the host's namespaces are looked up at the scan
and once a minute (~0.4 ms with 100 processes), with a pid filter each pid's namespace is read
a dump (a readlink, ~5 µs); with a pid filter whose processes are all in another namespace,
our own is not dumped at all.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace

from otelwater.errors import EnvironmentProblem, UsageError
from otelwater.events.model import TCP_STATES, WaterSnapshot
from otelwater.hostsockets import (Borrower, OwnerResolver, SocketFigures, TcpQueue, namespaces,
                                   netns_inode, process_name, socket_inodes, tcp_queues)
from otelwater.sockkey import addr16, addr_text, sock_key

TRIGGER = "standing"
CPU_BUDGET = 0.10          # share of one CPU the dumps may take (see module docstring)
HEARTBEAT_S = 60.0         # an unchanged standing socket is reported again this often
NAMESPACES_S = 60.0        # without a pid or cgroup filter: the host's namespaces looked up again

# linux/sock_diag.h, linux/inet_diag.h, linux/netlink.h (kernel ABI, stable since 2.6)
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_INFO, INET_DIAG_SKMEMINFO = 2, 7
SK_MEMINFO_RMEM_ALLOC, SK_MEMINFO_RCVBUF, SK_MEMINFO_BACKLOG, SK_MEMINFO_DROPS = 0, 1, 7, 8
_NAME = {v: k for k, v in TCP_STATES.items()}
# states whose sockets can hold unread bytes (see the module docstring)
STATES = ("ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "CLOSING")
STATE_MASK = sum(1 << _NAME[s] for s in STATES)
_DUMPED = frozenset(_NAME[s] for s in STATES)
# a FIN arrived in these states: rcv_nxt counts its sequence number until it is read
FIN_IN = frozenset(_NAME[s] for s in ("CLOSE_WAIT", "LAST_ACK", "CLOSING"))
EXTENSIONS = (1 << (INET_DIAG_SKMEMINFO - 1)) | (1 << (INET_DIAG_INFO - 1))

_NLMSG = struct.Struct("=IHHII")          # nlmsghdr: len, type, flags, seq, pid
_MSG_AT = _NLMSG.size                     # struct inet_diag_msg follows the header
_STATE = _MSG_AT + 1                      # idiag_state u8
_PORTS = struct.Struct(">HH")             # idiag_sport, idiag_dport (network order)
_PORTS_AT = _MSG_AT + 4
_RQ_INO = struct.Struct("=I8xI")          # idiag_rqueue, (wqueue, uid), idiag_inode
_RQ_AT = _MSG_AT + 56
_MSG_LEN = _MSG_AT + 72
RECV_BYTES = 1 << 16                      # a netlink dump skb is at most 32 KiB


def unread_from_rqueue(rqueue: int, state: int) -> int:
    """SIOCINQ from sock_diag's idiag_rqueue (rcv_nxt - copied_seq): less the FIN's sequence
    number while it is unread, as tcp_inq does (SOCK_DONE is set exactly in the FIN_IN states;
    a FIN followed by a reset, state CLOSE, would read one byte high)."""
    return rqueue - 1 if rqueue and state in FIN_IN else rqueue


def next_gap_s(cost_ns: int, floor_s: float, budget: float = CPU_BUDGET) -> float:
    """Seconds between dumps so that one costing cost_ns of CPU stays within budget."""
    return max(floor_s, cost_ns / 1e9 / budget)


def water_of(s: WaterSnapshot) -> tuple:
    """What a standing socket's report says that can change: its water and its state."""
    return (s.level, s.volume, s.unread_bytes, s.capacity, s.backlog, s.drops, s.tcp_state)


def skmeminfo(raw: str | bytes) -> tuple[int, ...]:
    """INET_DIAG_SKMEMINFO's u32 array (pyroute2 gives it as "d0:c9:00:..." hex)."""
    if isinstance(raw, str):
        raw = bytes.fromhex(raw.replace(":", ""))
    return struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4])


@dataclass(frozen=True, slots=True)
class Prefilter:
    """What can be decided from a message's fixed fields, before decoding it."""

    ports: frozenset[int] = frozenset()        # empty: any
    inodes: frozenset[int] | None = None        # None: any

    def passes(self, buf, at: int) -> bool:
        """The netlink message at `at` in buf: a socket holding water that the filters keep."""
        rqueue, ino = _RQ_INO.unpack_from(buf, at + _RQ_AT)
        if unread_from_rqueue(rqueue, buf[at + _STATE]) <= 0:
            return False
        if self.ports:
            sport, dport = _PORTS.unpack_from(buf, at + _PORTS_AT)
            if sport not in self.ports and dport not in self.ports:
                return False
        return self.inodes is None or ino in self.inodes


def iter_messages(buf) -> Iterator[tuple[int, int, int, int]]:
    """(type, sequence number, offset, length) of each netlink message in one recv buffer."""
    at, end = 0, len(buf)
    while at + _NLMSG.size <= end:
        length, mtype, _flags, seq, _pid = _NLMSG.unpack_from(buf, at)
        if length < _NLMSG.size:
            break
        yield mtype, seq, at, length
        at += (length + 3) & ~3


def snapshot_from_msg(msg, ts_ns: int, netns: int, owner: tuple[int, str] | None
                      ) -> WaterSnapshot:
    """A WaterSnapshot from one decoded pyroute2 inet_diag_msg (addresses as text)."""
    state = msg["idiag_state"]
    mem = skmeminfo(msg.get_attr("INET_DIAG_SKMEMINFO") or b"")
    mem = mem + (0,) * (SK_MEMINFO_DROPS + 1 - len(mem))
    laddr, raddr = addr16(msg["idiag_src"]), addr16(msg["idiag_dst"])
    lport, rport = msg["idiag_sport"], msg["idiag_dport"]
    pid, comm = owner or (0, "")
    return WaterSnapshot(
        ts_ns=ts_ns, sock_key=sock_key(netns, laddr, lport, raddr, rport),
        pid=pid, comm=comm, tid=0, netns=netns,
        laddr=addr_text(laddr), lport=lport, raddr=addr_text(raddr), rport=rport,
        level=0,  # sk_receive_queue.qlen is not in sock_diag: 0 means unknown here
        volume=mem[SK_MEMINFO_RMEM_ALLOC],
        unread_bytes=unread_from_rqueue(msg["idiag_rqueue"], state),
        capacity=mem[SK_MEMINFO_RCVBUF], backlog=mem[SK_MEMINFO_BACKLOG],
        drops=mem[SK_MEMINFO_DROPS], drop_events=0, drop_reason="",
        bytes_arrived=0, bytes_read=0,  # rcv_nxt/copied_seq: not in sock_diag
        trigger=TRIGGER, tcp_state=TCP_STATES.get(state, ""), ino=msg["idiag_inode"],
    )


def snapshot_from_row(row: TcpQueue, ts_ns: int, netns: int, owner: tuple[int, str] | None,
                      figures: SocketFigures | None) -> WaterSnapshot:
    """A WaterSnapshot from a /proc/PID/net/tcp{,6} row of another network namespace, with the
    socket's own figures when they could be read (else unread bytes from rx_queue, the rest 0:
    unknown, as the level is)."""
    mem = figures.meminfo if figures is not None else ()
    mem = mem + (0,) * (SK_MEMINFO_DROPS + 1 - len(mem))
    pid, comm = owner or (0, "")
    return WaterSnapshot(
        ts_ns=ts_ns, sock_key=sock_key(netns, row.laddr, row.lport, row.raddr, row.rport),
        pid=pid, comm=comm, tid=0, netns=netns,
        laddr=addr_text(row.laddr), lport=row.lport, raddr=addr_text(row.raddr),
        rport=row.rport, level=0,
        volume=mem[SK_MEMINFO_RMEM_ALLOC],
        unread_bytes=(figures.unread_bytes if figures is not None
                      else unread_from_rqueue(row.rx_queue, row.state)),
        capacity=mem[SK_MEMINFO_RCVBUF], backlog=mem[SK_MEMINFO_BACKLOG],
        drops=mem[SK_MEMINFO_DROPS], drop_events=0, drop_reason="",
        bytes_arrived=0, bytes_read=0,
        trigger=TRIGGER, tcp_state=TCP_STATES.get(row.state, ""), ino=row.inode,
    )


def decode(buf, at: int, length: int):
    """pyroute2's decoding of one inet_diag_msg (family from the message itself)."""
    from pyroute2.netlink.diag import inet_diag_msg

    msg = inet_diag_msg(bytes(buf[at:at + length]))
    msg.decode()
    return msg


def dump_request(family: int, seq: int) -> bytes:
    from pyroute2.netlink.diag import inet_diag_req

    req = inet_diag_req()
    req["header"]["type"] = SOCK_DIAG_BY_FAMILY
    req["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    req["header"]["sequence_number"] = seq
    req["sdiag_family"] = family
    req["sdiag_protocol"] = socket.IPPROTO_TCP
    req["idiag_ext"] = EXTENSIONS
    req["idiag_states"] = STATE_MASK
    req.encode()
    return bytes(req.data)


def cgroup_pids(path: str) -> set[int]:
    """The processes of a cgroup v2 directory and of every cgroup below it (a slice's services,
    a pod's containers). The directory itself must be readable (a usage error otherwise); a
    sub-cgroup that went away meanwhile is skipped."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            out = {int(line) for line in f if line.strip()}
    except OSError as e:
        raise UsageError(f"cgroup {path!r} has no readable cgroup.procs ({e.strerror})",
                         "give a cgroup v2 directory, e.g. /sys/fs/cgroup/my.slice") from None
    for sub in cgroup_tree(path)[1:]:
        try:
            with open(os.path.join(sub, "cgroup.procs")) as f:
                out.update(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def cgroup_tree(path: str) -> list[str]:
    """A cgroup v2 directory and every cgroup directory below it (itself first)."""
    return [root for root, _dirs, files in os.walk(path) if "cgroup.procs" in files] or [path]


class StandingWater:
    """Sockets holding unread data, from one sock_diag dump, with the kernel probe's filters.

    scan(now_ns)              dump now; every socket holding water that the filters keep
    sweep(now_ns, quiet_keys) the standing sockets the probe has not seen whose water changed
                              since they were last reported, or last reported heartbeat_s ago
                              (re-dump first when the last dump is at least min_gap_s old)
    keys                      sock_keys of the last dump's standing sockets
    last_arrival_ms           sock_key -> ms since data last arrived (tcp_info), last dump
    min_gap_s, last_cost_ns, last_socket_count   the dump's measured cost and what it implies
    last_namespaces           network namespaces the last dump looked in
    """

    def __init__(self, ports: frozenset[int] = frozenset(), pids: frozenset[int] = frozenset(),
                 cgroups: frozenset[str] = frozenset(), floor_s: float = 1.0,
                 heartbeat_s: float = HEARTBEAT_S):
        self.ports = frozenset(ports)
        self.pids = frozenset(pids)
        self.cgroups = frozenset(cgroups)
        for path in self.cgroups:
            cgroup_pids(path)  # a bad directory is a usage error now, not at the first sweep
        import pyroute2.netlink.diag  # noqa: F401  (~0.2 s once: not a dump's cost)

        self.floor_s = floor_s
        self.min_gap_s = floor_s
        self.heartbeat_ns = int(heartbeat_s * 1e9)
        self.last_cost_ns = 0
        self.last_socket_count = 0
        self.last_arrival_ms: dict[int, int] = {}
        self.last_namespaces = 0
        self._netns = netns_inode("self")
        self._owners = OwnerResolver()
        self._borrower = Borrower()
        self._others: dict[int, int | str] = {}   # the host's other namespaces -> a process
        self._others_ns: int | None = None         # when they were looked up (None: never)
        self._held_pids: frozenset[int] | set[int] = frozenset()
        self._standing: dict[int, WaterSnapshot] = {}
        self._reported: dict[int, tuple[tuple, int]] = {}   # key -> (water_of, when reported)
        self._last_dump_ns: int | None = None
        self._seq = 0
        self._sock: socket.socket | None = None

    # -- public ------------------------------------------------------------------------------
    @property
    def keys(self) -> frozenset[int]:
        return frozenset(self._standing)

    def scan(self, now_ns: int) -> list[WaterSnapshot]:
        """Dump now: every socket holding water that the filters keep (all reported now)."""
        self._others_ns = None
        snaps = self._dump_standing(now_ns)
        self._reported = {s.sock_key: (water_of(s), now_ns) for s in snaps}
        return snaps

    def sweep(self, now_ns: int, quiet_keys: Collection[int]) -> list[WaterSnapshot]:
        """The standing sockets whose keys are in quiet_keys (the caller's: no kernel event on
        them) whose water changed since they were last reported, or that were last reported
        heartbeat_s ago or more, stamped now_ns. Between dumps their figures are the last
        dump's, still exact while the kernel saw nothing move; a socket the probe has seen is
        its to report (and, quiet again, reported at once)."""
        if self._last_dump_ns is None or now_ns - self._last_dump_ns >= self.min_gap_s * 1e9:
            self._dump_standing(now_ns)
        out = []
        reported = self._reported
        for k, s in self._standing.items():
            if k not in quiet_keys:
                reported.pop(k, None)
                continue
            water = water_of(s)
            last = reported.get(k)
            if last is not None and last[0] == water and now_ns - last[1] < self.heartbeat_ns:
                continue
            reported[k] = (water, now_ns)
            out.append(s if s.ts_ns == now_ns else replace(s, ts_ns=now_ns))
        return out

    def _dump_standing(self, now_ns: int) -> list[WaterSnapshot]:
        t0 = time.thread_time_ns()
        held = self._held_inodes()
        own, others = self._namespaces(held, now_ns)
        standing, ages, count = {}, {}, 0
        if own:
            pre = Prefilter(self.ports, None if held is None else frozenset(held))
            for family in (socket.AF_INET, socket.AF_INET6):
                for buf, at, length in self._dump(family):
                    count += 1
                    if not pre.passes(buf, at):
                        continue
                    msg = decode(buf, at, length)
                    ino = msg["idiag_inode"]
                    owner = self._owner(ino, held)
                    snap = snapshot_from_msg(msg, now_ns, self._netns, owner)
                    standing[snap.sock_key] = snap
                    info = msg.get_attr("INET_DIAG_INFO")
                    if info:
                        ages[snap.sock_key] = info["tcpi_last_data_recv"]
        if others:
            try:
                count += self._dump_others(others, held, now_ns, standing, ages)
            finally:
                self._borrower.release()
        self.last_namespaces = len(others) + own
        self._standing, self.last_arrival_ms = standing, ages
        if any(k not in standing for k in self._reported):   # drained or gone: forgotten
            self._reported = {k: v for k, v in self._reported.items() if k in standing}
        self._last_dump_ns = now_ns
        self.last_socket_count = count
        self.last_cost_ns = time.thread_time_ns() - t0
        self.min_gap_s = next_gap_s(self.last_cost_ns, self.floor_s)
        return list(standing.values())

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- inside ------------------------------------------------------------------------------
    def _held_inodes(self) -> dict[int, int] | None:
        """inode -> holding pid under the pid/cgroup filters (None: no such filter); the
        processes looked at are left in _held_pids."""
        if not self.pids and not self.cgroups:
            return None
        by_pid = None
        if self.pids:
            by_pid = {ino: pid for pid in self.pids for ino in socket_inodes(pid).values()}
            self._held_pids = self.pids
        if self.cgroups:
            members = set().union(*(cgroup_pids(p) for p in self.cgroups))
            by_cg = {ino: pid for pid in members for ino in socket_inodes(pid).values()}
            by_pid = by_cg if by_pid is None else {i: p for i, p in by_pid.items() if i in by_cg}
            self._held_pids = members if not self.pids else self.pids & members
        return by_pid

    def _owner(self, ino: int, held: dict[int, int] | None) -> tuple[int, str] | None:
        if held is not None and ino in held:
            return held[ino], process_name(held[ino])
        return self._owners.owner(ino)

    def _holder(self, ino: int, held: dict[int, int] | None, fds: dict) -> tuple[int, int] | None:
        """(pid, fd) holding the socket: with a filter, the pid's fd table (read once a dump,
        and only for a socket of another namespace holding water); else the owners' scan."""
        if held is None:
            return self._owners.holder(ino)
        pid = held.get(ino)
        if pid is None:
            return None
        if pid not in fds:
            fds[pid] = {i: fd for fd, i in socket_inodes(pid).items()}
        fd = fds[pid].get(ino)
        return None if fd is None else (pid, fd)

    def _namespaces(self, held: dict[int, int] | None, now_ns: int
                    ) -> tuple[bool, dict[int, int | str]]:
        """(dump our own namespace through sock_diag?, the other namespaces to read -> a process
        in each). With a pid or cgroup filter: the namespaces of the processes holding the
        sockets it keeps (a readlink each); without: ours, and every other one on the host, looked
        up at the scan and every NAMESPACES_S after (a socket made since in a namespace made
        since had its events: the kernel probe's)."""
        if held is None:
            if self._others_ns is None or now_ns - self._others_ns >= NAMESPACES_S * 1e9:
                self._others = {ns: pid for ns, pid in self._host_namespaces().items()
                                if ns != self._netns}
                self._others_ns = now_ns
            return True, self._others
        spaces = self._namespaces_of(sorted(self._held_pids))
        own = spaces.pop(self._netns, None) is not None
        return own, spaces

    def _namespaces_of(self, pids) -> dict[int, int | str]:
        return namespaces(pids)

    def _host_namespaces(self) -> dict[int, int | str]:
        return namespaces()

    def _tables(self, pid: int | str) -> list[TcpQueue] | None:
        return tcp_queues(pid, self.ports)

    def _dump_others(self, others: dict[int, int | str], held, now_ns: int,
                     standing: dict, ages: dict) -> int:
        """Standing water in the other namespaces, from a process's /proc/PID/net/tcp{,6} each,
        with each socket's own figures read on its holder's fd where allowed (Borrower).
        Returns the rows with water seen (sock_diag's count is of every socket)."""
        count = 0
        gone = False
        fds: dict[int, dict[int, int]] = {}
        for netns, pid in others.items():
            rows = self._tables(pid)
            if rows is None:
                gone = True     # the process left: look the namespaces up again next dump
                continue
            count += len(rows)
            for row in rows:
                if row.state not in _DUMPED or (held is not None and row.inode not in held):
                    continue
                if unread_from_rqueue(row.rx_queue, row.state) <= 0:
                    continue
                holder = self._holder(row.inode, held, fds)
                figures = (self._borrower.figures(holder[0], holder[1], row.inode)
                           if holder is not None else None)
                snap = snapshot_from_row(row, now_ns, netns, self._owner(row.inode, held),
                                         figures)
                if snap.unread_bytes <= 0:
                    continue
                standing[snap.sock_key] = snap
                if figures is not None:
                    ages[snap.sock_key] = figures.last_data_recv_ms
        if gone and held is None:
            self._others_ns = None
        return count

    def _dump(self, family: int) -> Iterator[tuple[memoryview, int, int]]:
        """(buffer, offset, length) of each inet_diag_msg of one dump of one family."""
        if self._sock is None:
            try:
                self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
            except OSError as e:
                raise EnvironmentProblem(f"cannot open sock_diag ({e.strerror})",
                                         "load the kernel's inet_diag and tcp_diag modules "
                                         "(modprobe tcp_diag)") from None
        self._seq += 1
        self._sock.send(dump_request(family, self._seq))
        while True:
            data = memoryview(self._sock.recv(RECV_BYTES))
            for mtype, seq, at, length in iter_messages(data):
                if seq != self._seq:
                    continue  # the rest of an earlier dump that was given up midway
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, at + _NLMSG.size)
                    if family == socket.AF_INET6:
                        return  # no IPv6 on this host (inet6 diag refused): no IPv6 sockets
                    raise EnvironmentProblem(f"sock_diag dump refused ({os.strerror(-err)})",
                                             "load the kernel's tcp_diag module "
                                             "(modprobe tcp_diag)")
                if mtype == SOCK_DIAG_BY_FAMILY and length >= _MSG_LEN:
                    yield data, at, length
