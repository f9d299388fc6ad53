"""Facts about loaded BPF programs and maps, read cheaply from their fds through the bpf(2)
syscall (BCC's libbcc wrappers, as otelwater.probes.kernel reads its socket table): what the
agent's self-metrics say about its own probes.

    prog_info(fd)          BPF_OBJ_GET_INFO_BY_FD: name, id, type, run_time_ns, run_cnt,
                           recursion_misses (one syscall, a few microseconds)
    map_info(fd)           BPF_OBJ_GET_INFO_BY_FD: name, id, type, key and value size,
                           max_entries, flags
    map_entries(fd, info)  entries in a hash map now, or None for a map that is not one
    programs_of(bpf)       a BCC object's loaded programs, {name: fd} (BPF.funcs)
    maps_of(bpf)           a BCC object's maps, {name: fd} (every table of its module, also
                           those Python never opened)
    stats_enabled()        kernel.bpf_stats_enabled
    enable_stats()         BPF_ENABLE_STATS (needs CAP_SYS_ADMIN: benchmarks, never the agent)

Run time. The kernel counts run_time_ns and run_cnt only while its BPF statistics are on: the
sysctl kernel.bpf_stats_enabled=1, or while some process holds a BPF_ENABLE_STATS fd (which
needs CAP_SYS_ADMIN, and which the sysctl does not show). Both stay 0 otherwise (and stop
moving when the statistics are switched off: they count the runs while they were on). The agent
never switches them on (it must not need CAP_SYS_ADMIN, and the statistics cost every BPF
program on the machine two clock reads a run): `counted(prog)` says whether the kernel has
counted a program's runs, and only then are they worth reporting.

Map entries. The kernel keeps no count a user can read cheaply, so map_entries() reads the
keys: by batches of up to BATCH entries a syscall (BPF_MAP_LOOKUP_BATCH, Linux 5.6+; the values
come along, at most BATCH_BYTES of buffer), else one key at a time (BPF_MAP_GET_NEXT_KEY),
stopping at max_entries either way: a walk that races the programs (keys deleted under it make
GET_NEXT_KEY start again from the first) is bounded, its count never above max_entries. Neither
touches an LRU map's eviction order. Measured on the 2-vCPU test VM (Linux 6.18), a full
65,536-entry LRU hash with 408-byte values (water.c's socket table), CPU time: 22-30 ms by
batches (0.4 µs an entry, the GIL released during each syscall), 121-149 ms one key at a time
(2 µs an entry, the GIL held between the calls); twice that in wall time while the other vCPU's
work competed (tests/integration/test_agent_bpfinfo.py prints it with -s). Counted: the hash
family (hash, percpu hash, LRU hash, LRU percpu hash, hash of maps). Not counted (None): arrays
of every kind (always their full size: their max_entries says it), ring buffers and perf event
arrays (max_entries is bytes or CPUs, not entries), task/socket/inode storage (no key walk),
and the rest.

The fds are the caller's: a fd closed under a read (a probe closed meanwhile) is an OSError
here, never a crash; the caller skips that object.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8
BATCH = 1024                    # entries one BPF_MAP_LOOKUP_BATCH reads, at most
BATCH_BYTES = 512 * 1024        # ...and its buffers' size, at most (values: value_size each)
STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
ENOTSUPP = 524                  # the kernel's own "operation not supported" (not in errno)

# enum bpf_map_type (include/uapi/linux/bpf.h)
MAP_TYPES = ("unspec", "hash", "array", "prog_array", "perf_event_array", "percpu_hash",
             "percpu_array", "stack_trace", "cgroup_array", "lru_hash", "lru_percpu_hash",
             "lpm_trie", "array_of_maps", "hash_of_maps", "devmap", "sockmap", "cpumap",
             "xskmap", "sockhash", "cgroup_storage", "reuseport_sockarray",
             "percpu_cgroup_storage", "queue", "stack", "sk_storage", "devmap_hash",
             "struct_ops", "ringbuf", "inode_storage", "task_storage", "bloom_filter",
             "user_ringbuf", "cgrp_storage", "arena")
COUNTED_TYPES = frozenset(MAP_TYPES.index(t) for t in
                          ("hash", "percpu_hash", "lru_hash", "lru_percpu_hash",
                           "hash_of_maps"))
PERCPU_TYPES = frozenset(MAP_TYPES.index(t) for t in ("percpu_hash", "lru_percpu_hash"))


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info (include/uapi/linux/bpf.h, Linux 6.x). The kernel fills what it
    knows of it and leaves the rest 0 (an older kernel: no run_time_ns before 5.1); no pointer
    field is set, so it writes nothing else."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32), ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32), ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    """struct bpf_map_info (include/uapi/linux/bpf.h, Linux 6.x)."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str                   # the kernel's: 15 characters at most, part of BCC's name
    run_time_ns: int            # while the statistics were on (module docstring)
    run_cnt: int
    recursion_misses: int


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    name: str                   # the kernel's: the first 15 characters of BCC's
    key_size: int
    value_size: int
    max_entries: int            # ring buffer: its bytes; perf event array: CPUs
    flags: int

    @property
    def type_name(self) -> str:
        return MAP_TYPES[self.type] if self.type < len(MAP_TYPES) else str(self.type)

    @property
    def counted(self) -> bool:
        """map_entries() counts this map (a hash)."""
        return self.type in COUNTED_TYPES


class _Lib:
    """The libbcc functions used here, declared on a handle of our own (BCC's module-level
    `lib` declares only some of them; its declarations are left as they are)."""

    def __init__(self):
        from bcc.libbcc import lib as bcc_lib

        lib = ctypes.CDLL(bcc_lib._name, use_errno=True)
        u32p = ctypes.POINTER(ctypes.c_uint32)
        self.obj_get_info = lib.bpf_obj_get_info
        self.obj_get_info.argtypes = [ctypes.c_int, ctypes.c_void_p, u32p]
        self.obj_get_info.restype = ctypes.c_int
        self.get_next_key = lib.bpf_get_next_key
        self.get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.get_next_key.restype = ctypes.c_int
        self.lookup_batch = lib.bpf_lookup_batch
        self.lookup_batch.argtypes = [ctypes.c_int, u32p, u32p, ctypes.c_void_p,
                                      ctypes.c_void_p, u32p]
        self.lookup_batch.restype = ctypes.c_int
        self.num_tables = lib.bpf_num_tables
        self.num_tables.argtypes = [ctypes.c_void_p]
        self.num_tables.restype = ctypes.c_size_t
        self.table_name = lib.bpf_table_name
        self.table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.table_name.restype = ctypes.c_char_p
        self.table_fd_id = lib.bpf_table_fd_id
        self.table_fd_id.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.table_fd_id.restype = ctypes.c_int


_lib: _Lib | None = None


def _libbcc() -> _Lib:
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


def _failed(res: int, what: str, fd: int) -> OSError:
    err = ctypes.get_errno() or (-res if res < 0 else errno.EIO)
    return OSError(err, f"{what} of fd {fd}: {os.strerror(err)}")


def _obj_info(fd: int, info: ctypes.Structure, what: str) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    res = _libbcc().obj_get_info(fd, ctypes.byref(info), ctypes.byref(size))
    if res:
        raise _failed(res, what, fd)


def prog_info(fd: int) -> ProgInfo:
    """The facts of the BPF program behind `fd` (OSError: not a BPF program, or closed)."""
    i = _ProgInfo()
    _obj_info(fd, i, "BPF_OBJ_GET_INFO_BY_FD (program)")
    return ProgInfo(i.id, i.type, i.name.decode(errors="replace"), i.run_time_ns, i.run_cnt,
                    i.recursion_misses)


def map_info(fd: int) -> MapInfo:
    """The facts of the BPF map behind `fd` (OSError: not a BPF map, or closed)."""
    i = _MapInfo()
    _obj_info(fd, i, "BPF_OBJ_GET_INFO_BY_FD (map)")
    return MapInfo(i.id, i.type, i.name.decode(errors="replace"), i.key_size, i.value_size,
                   i.max_entries, i.map_flags)


def stats_enabled() -> bool:
    """kernel.bpf_stats_enabled is 1 (False also when it cannot be read). A BPF_ENABLE_STATS
    fd held by some process turns the counting on without showing here: see counted()."""
    try:
        with open(STATS_SYSCTL) as f:
            return f.read().strip() not in ("", "0")
    except OSError:
        return False


def counted(prog: ProgInfo, enabled: bool | None = None) -> bool:
    """The kernel counts (or has counted) this program's runs: the statistics are on
    (`enabled`, else read now) or it holds a count from a time they were."""
    if prog.run_cnt or prog.run_time_ns:
        return True
    return stats_enabled() if enabled is None else enabled


def enable_stats() -> int:
    """An fd that keeps the kernel's BPF run-time statistics on while it is open (libbpf's
    bpf_enable_stats, BPF_STATS_RUN_TIME; off again when the fd is closed or the process dies
    however it dies; kernel.bpf_stats_enabled is neither read nor written). Needs
    CAP_SYS_ADMIN: for benchmarks, not the agent."""
    libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
    libbpf.bpf_enable_stats.argtypes = [ctypes.c_int]
    fd = libbpf.bpf_enable_stats(0)    # BPF_STATS_RUN_TIME
    if fd < 0:
        err = ctypes.get_errno() or -fd
        raise OSError(err, f"BPF_ENABLE_STATS failed: {os.strerror(err)}")
    return fd


def map_entries(fd: int, info: MapInfo | None = None) -> int | None:
    """Entries in the hash map behind `fd` now, at most its max_entries; None for a map
    whose entries are not counted (module docstring). `info`: its map_info(), when known.
    OSError when the map cannot be read (closed meanwhile)."""
    info = info if info is not None else map_info(fd)
    if not info.counted or info.max_entries == 0:
        return None
    got = _count_by_batches(fd, info)
    return got if got is not None else _count_by_keys(fd, info)


def _value_bytes(info: MapInfo) -> int:
    """What the kernel copies out per entry: a per-CPU map's value once per possible CPU,
    each rounded up to 8 bytes."""
    if info.type in PERCPU_TYPES:
        return ((info.value_size + 7) & ~7) * _possible_cpus()
    return info.value_size


def _possible_cpus() -> int:
    """CPUs the kernel may bring up (/sys/devices/system/cpu/possible: "0-3,5"), as BCC and
    libbpf size per-CPU values."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            spec = f.read().strip()
        n = 0
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            n = max(n, int(hi or lo) + 1)
        return n
    except (OSError, ValueError):
        return os.cpu_count() or 1


def _count_by_batches(fd: int, info: MapInfo) -> int | None:
    """BPF_MAP_LOOKUP_BATCH, token by token until ENOENT (the end); None when the kernel has
    no batch lookup for this map (then keys one at a time)."""
    lib = _libbcc()
    per = info.key_size + _value_bytes(info)
    batch = max(1, min(BATCH, info.max_entries, BATCH_BYTES // max(1, per)))
    keys = ctypes.create_string_buffer(batch * info.key_size)
    values = ctypes.create_string_buffer(batch * _value_bytes(info))
    token_in, token_out, count = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint32()
    n, first = 0, True
    while n < info.max_entries:
        count.value = batch
        res = lib.lookup_batch(fd, None if first else ctypes.byref(token_in),
                               ctypes.byref(token_out), keys, values, ctypes.byref(count))
        n += count.value
        if res:
            err = ctypes.get_errno() or -res
            if err == errno.ENOENT:          # the end (count: the last ones)
                break
            if err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, ENOTSUPP, errno.EPERM,
                       errno.ENOSPC):        # no batch lookup here (ENOSPC: a bucket > batch)
                return None
            raise _failed(res, "BPF_MAP_LOOKUP_BATCH", fd)
        token_in.value = token_out.value
        first = False
    return min(n, info.max_entries)


def _count_by_keys(fd: int, info: MapInfo) -> int:
    """BPF_MAP_GET_NEXT_KEY from the first key, at most max_entries steps."""
    lib = _libbcc()
    key = ctypes.create_string_buffer(max(1, info.key_size))
    nxt = ctypes.create_string_buffer(max(1, info.key_size))
    n, limit = 0, info.max_entries
    res = lib.get_next_key(fd, None, nxt)
    while res == 0 and n < limit:
        n += 1
        key, nxt = nxt, key
        res = lib.get_next_key(fd, key, nxt)
    if res and n < limit:
        err = ctypes.get_errno() or -res
        if err != errno.ENOENT:
            raise _failed(res, "BPF_MAP_GET_NEXT_KEY", fd)
    return n


def programs_of(bpf) -> dict[str, int]:
    """{name: fd} of the programs a BCC BPF object has loaded (BCC's names, whole; each
    attach loads one into `funcs`). Empty once the object is closed."""
    funcs = getattr(bpf, "funcs", None) or {}
    out = {}
    for name, fn in list(funcs.items()):
        fd = getattr(fn, "fd", -1)
        if fd is not None and fd >= 0:
            out[name.decode() if isinstance(name, bytes) else str(name)] = fd
    return out


def maps_of(bpf) -> dict[str, int]:
    """{name: fd} of every map of a BCC BPF object's module (BCC creates each declared table
    when it loads the object, whether Python opens it or not). Empty once it is closed."""
    module = getattr(bpf, "module", None)
    if not module:
        return {}
    lib = _libbcc()
    out = {}
    for i in range(lib.num_tables(module)):
        name = lib.table_name(module, i)
        fd = lib.table_fd_id(module, i)
        if name and fd >= 0:
            out[name.decode(errors="replace")] = fd
    return out
