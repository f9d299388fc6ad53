"""Checks of the targets the commands are given (pids, cgroup directories), made before
anything attaches: a bad one is one line naming it and the fix (exit 4)."""

from __future__ import annotations

import ctypes
import os

from otelwater.errors import NoSuchProcess, TargetError

CGROUP2_SUPER_MAGIC = 0x63677270


def _check_pids(pids):
    for pid in pids:
        if pid < 1 or not os.path.exists(f"/proc/{pid}"):
            raise NoSuchProcess(f"no process with pid {pid}", "check the pid with ps or pgrep")


def _fs_magic(path: str) -> int:
    """statfs(2)'s f_type: which filesystem a path lives on."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(512)  # struct statfs: 120 bytes on x86-64, f_type first
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def cgroup2_mounts() -> list[str]:
    """Mount points of the cgroup v2 hierarchy in this mount namespace."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields, _, fs = line.partition(" - ")
                if fs.split()[:1] == ["cgroup2"]:
                    out.append(fields.split()[4].replace("\\040", " "))
    except OSError:
        pass
    return out


def _check_cgroups(cgroups):
    for d in cgroups:
        mounts = cgroup2_mounts()
        fix = (f"give a directory under {mounts[0]} (the cgroup v2 hierarchy), e.g. "
               f"{mounts[0]}/my.slice" if mounts else
               "this host has no cgroup v2 hierarchy: mount one "
               "(mount -t cgroup2 none /sys/fs/cgroup/unified) or leave --cgroup out")
        if not os.path.exists(d):
            raise TargetError(f"cgroup {d} does not exist", fix)
        if not os.path.isdir(d):
            raise TargetError(f"cgroup {d} is not a directory", fix)
        try:
            magic = _fs_magic(d)
        except OSError as e:
            raise TargetError(f"cannot check cgroup {d} ({e.strerror})", fix) from None
        if magic != CGROUP2_SUPER_MAGIC:
            raise TargetError(f"{d} is not a cgroup v2 directory", fix)
